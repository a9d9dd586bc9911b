"""The HTML report: attention maps, PCA, table and curves, and the CLI on real evaluate outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_rods import BUNDLE_SIZE, rod_item
from xray_images import pydicom_data_file

from xrayfm.cli import main
from xrayfm.models.backbones import create_backbone
from xrayfm.models.card import load_backbone
from xrayfm.report.analysis import cls_attention, pca_2d
from xrayfm.report.html import SECTIONS, build_report, label_efficiency_series
from xrayfm.report.inputs import load_metrics, load_run
from xrayfm.tasks.base import get_task
from xrayfm.tasks.evaluate import evaluate_heads
from xrayfm.tasks.train import HeadTrainConfig, head_arguments, save_head_bundle, train_head


def test_cls_attention_equals_timm_reference_attention() -> None:
    from timm.layers import Attention

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16", img_size=64).eval()
    img = np.random.default_rng(0).random((64, 48), dtype=np.float32)
    maps = cls_attention(bb, img)
    assert maps.shape == (3, 4, 3)
    block = bb.model.blocks[-1]
    block_in: list[torch.Tensor] = []
    hook = block.norm1.register_forward_hook(lambda m, i, o: block_in.append(o))
    with torch.no_grad():
        bb(torch.from_numpy(img)[None, None])
    hook.remove()
    # timm's reference attention, unfused, materialises softmax(q k^T) and passes it through attn_drop
    ref_attn = Attention(dim=192, num_heads=3, qkv_bias=True).eval()
    ref_attn.load_state_dict(block.attn.state_dict())
    ref_attn.fused_attn = False
    seen: list[torch.Tensor] = []
    ref_attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        assert torch.allclose(ref_attn(block_in[0]), block.attn(block_in[0]), atol=1e-5)
    ref = seen[0][0, :, 0, bb.model.num_prefix_tokens :].reshape(3, 4, 3).numpy()
    assert np.allclose(maps, ref, atol=1e-5)


def test_pca_2d_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    x = np.random.default_rng(1).normal(size=(30, 8)) * np.arange(1, 9)
    ours = pca_2d(x)
    ref = PCA(2).fit_transform(x)
    assert np.allclose(np.abs(ours), np.abs(ref), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        pca_2d(np.zeros((1, 4)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> dict[str, object]:
    """A real bundle, a pretrain-like run folder and real `evaluate_heads` documents (two label fractions)."""
    root = tmp_path_factory.mktemp("report")
    built = bundle_dir.parent  # the bundle's backbone and head bundles
    items = [rod_item(i, size=BUNDLE_SIZE, image="RG1_UNCR.dcm" if i % 2 else "RG3_UNCR.dcm") for i in range(8)]
    test = [
        rod_item(100 + i, size=BUNDLE_SIZE, image="RG1_UNCR.dcm" if i % 2 else "RG3_UNCR.dcm", split="test")
        for i in range(6)
    ]
    heads = [built / f"head_{t}" for t in ("classify", "segment", "detect")]
    full = evaluate_heads(built / "backbone", heads, test, items)
    bb, card = load_backbone(str(built / "backbone"))
    cfg = HeadTrainConfig(task="classify", img_size=BUNDLE_SIZE, epochs=2, batch_size=8, label_fraction=0.5)
    head, hist = train_head(bb, items, cfg)
    half_dir = save_head_bundle(
        root / "head_half", head, cfg, bb, card, hist, head_arguments(get_task("classify"), cfg)
    )
    half = evaluate_heads(built / "backbone", [half_dir], test)
    paths = {}
    for name, doc in (("full", full), ("half", half)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(doc, default=float))
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / s, "images_per_s": 10.0}) + "\n" for s in range(1, 6))
    )
    (run / "model_card.json").write_text((built / "backbone" / "model_card.json").read_text())
    (run / "config.yaml").write_text("arch: vit_tiny_patch16\nepochs: 1\n")
    return {"bundle": bundle_dir, "full": paths["full"], "half": paths["half"], "run": run}


def test_metrics_and_run_loading(inputs: dict[str, Path]) -> None:
    full, half = load_metrics(f"random ViT={inputs['full']}"), load_metrics(str(inputs["half"]))
    assert full.label == "random ViT" and full.label_fraction == 1.0
    assert half.label == "vit_tiny_patch16 (random_init)" and half.label_fraction == 0.5
    half.label = full.label
    series = label_efficiency_series([full, half])
    assert series["classification accuracy"]["random ViT"][0] == [0.5, 1.0]
    run = load_run(inputs["run"])
    assert run.steps == [1, 2, 3, 4, 5] and run.losses[0] == 5.0
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_run(inputs["full"].parent)
    with pytest.raises(ValueError, match="no classification"):
        bad = inputs["run"] / "model_card.json"
        load_metrics(str(bad))


def test_report_from_empty_inputs_names_what_is_missing() -> None:
    page = build_report()
    assert all(f'id="{sid}"' in page for sid, _ in SECTIONS)
    assert "pass --metrics" in page and "pass --runs" in page


def test_report_cli_writes_one_self_contained_file(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    args = [
        "report",
        "--out",
        str(out),
        "--runs",
        str(inputs["run"]),
        "--metrics",
        f"ViT={inputs['full']}",
        "--metrics",
        f"ViT={inputs['half']}",
        "--model",
        str(inputs["bundle"]),
        "--images",
        str(pydicom_data_file("RG1_UNCR.dcm")),
        "--images",
        str(pydicom_data_file("RG3_UNCR.dcm")),
    ]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert int(done.value.code or 0) == 0
    assert "2 sample image(s)" in capsys.readouterr().out
    page = out.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for sid, _ in SECTIONS:
        block = page.split(f'id="{sid}"')[1].split("<section")[0]
        assert "<img" in block or sid in ("results", "provenance"), f"section {sid} has no figure"
    assert "ViT · kNN on features" in page and "RG1_UNCR.dcm" in page
    assert list(tmp_path.glob("*.html")) == [out] and (tmp_path / "report_run" / "config.yaml").is_file()


def test_overlay_draws_mask_box_head_and_tip_at_their_pixels() -> None:
    from xrayfm.report.overlay import BOX_RGB, HEAD_RGB, MASK_RGB, TIP_RGB, draw_overlay

    img = np.full((120, 160), 0.2, np.float32)
    mask = np.zeros_like(img, dtype=bool)
    mask[100:110, 10:20] = True
    screw = {"head": [40.0, 50.0], "tip": [110.0, 60.0], "box": [30.0, 40.0, 120.0, 70.0], "confidence": 0.9}
    top3 = [{"region": "thorax", "probability": 0.7}]
    out = draw_overlay(img, {"metal_mask": mask, "screws": [screw], "top3": top3})
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    assert np.array_equal(out[105, 15], np.round(0.55 * 51 + 0.45 * np.array(MASK_RGB)).astype(np.uint8))
    assert tuple(out[50, 40]) == HEAD_RGB and tuple(out[60, 110]) == TIP_RGB
    assert tuple(out[55, 30]) == BOX_RGB and tuple(out[40, 75]) == BOX_RGB
    assert tuple(out[5, 150]) == (51, 51, 51)  # untouched background


def test_report_attention_backbone_must_be_a_vit(inputs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from xrayfm.models import create_backbone
    from xrayfm.models.card import export_backbone

    cnn = tmp_path / "cnn"
    export_backbone(create_backbone("resnet18", img_size=64), cnn, 64, extra={"method": "random_init"})
    args = ["report", "--out", str(tmp_path / "r.html"), "--model", str(inputs["bundle"]), "--images",
            str(pydicom_data_file("RG3_UNCR.dcm"))]
    for extra, code in (([], 0), (["--attention-backbone", str(inputs["bundle"])], 0),
                        (["--attention-backbone", str(cnn)], 2)):
        with pytest.raises(SystemExit) as done:
            main(args + extra)
        assert int(done.value.code or 0) == code, extra
    err = capsys.readouterr().err
    assert "not a ViT" in err and "\n" not in err.strip()
