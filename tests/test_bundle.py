"""Model bundle: built from a real exported backbone and heads trained with the real training code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tasks_rods import BUNDLE_SIZE, radiograph

from xrayfm.models.backbones import create_backbone
from xrayfm.models.bundle import ModelBundle, joint_features, screw_mm
from xrayfm.models.card import export_backbone


def real_image(name: str, side: int) -> np.ndarray:
    """A real CR radiograph in [0, 1] (area resizing may overshoot 1 by an ulp)."""
    return np.clip(radiograph(name, side=side), 0.0, 1.0)


def test_bundle_folder_and_card(bundle_dir: Path) -> None:
    card = json.loads((bundle_dir / "bundle.json").read_text())
    assert card["input_size"] == BUNDLE_SIZE and card["arch"] == "vit_tiny_patch16"
    assert set(card["heads"]) == {"classify", "segment", "detect"}
    assert card["class_names"][0] == "head" and len(card["class_names"]) == 11
    for task in card["heads"]:
        assert (bundle_dir / "heads" / task / "head.safetensors").is_file()
    b = ModelBundle.load(bundle_dir)
    assert b.card()["heads"] == {"classify": "linear", "segment": "seg_decoder", "detect": "screw_keypoints"}


@pytest.mark.parametrize("arch", ["vit_tiny_patch16", "resnet18"])
def test_joint_features_equal_separate_calls(arch: str) -> None:
    torch.manual_seed(0)
    bb = create_backbone(arch, img_size=BUNDLE_SIZE).eval()
    x = torch.rand(2, 1, BUNDLE_SIZE, BUNDLE_SIZE)
    with torch.no_grad():
        pooled, dense = joint_features(bb, x)
        assert torch.allclose(pooled, bb(x), atol=1e-5)
        for a, b in zip(dense, bb.forward_dense(x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_predict_maps_back_to_original_size(bundle_dir: Path) -> None:
    b = ModelBundle.load(bundle_dir)
    img = real_image("RG1_UNCR.dcm", 200)  # not square, not the input size
    calls = []
    b.backbone.model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    out = b.predict([img, img[:90, :70].copy()], pixel_spacing=[(0.2, 0.1), None], return_embedding=True)
    assert len(calls) == 1  # one backbone pass served all three heads for the batch
    r0, r1 = out
    assert (r0["height"], r0["width"]) == img.shape and (r1["height"], r1["width"]) == (90, 70)
    assert r0["metal_mask"].shape == img.shape and r1["metal_probability"].shape == (90, 70)
    assert r0["metal_mask"].dtype == bool and 0 <= r0["metal_probability"].min() <= 1
    assert {t["region"] for t in r0["top3"]} <= set(b.class_names)
    assert abs(sum(r0["probabilities"].values()) - 1) < 1e-4
    p = [t["probability"] for t in r0["top3"]]
    assert p == sorted(p, reverse=True)
    assert len(r0["embedding"]) == b.backbone.embed_dim
    h, w = img.shape
    for s in r0["screws"]:
        for x, y in (s["head"], s["tip"]):
            assert -1 <= x <= w + 1 and -1 <= y <= h + 1
        assert "length_mm" in s and s["confidence"] > 0
    assert all("length_mm" not in s for s in r1["screws"])


def test_predict_matches_a_single_image_call(bundle_dir: Path) -> None:
    b = ModelBundle.load(bundle_dir)
    a, c = real_image("RG1_UNCR.dcm", 128), real_image("RG3_UNCR.dcm", 96)
    both = b.predict([a, c])
    alone = b.predict([c])
    assert both[1]["top3"][0]["index"] == alone[0]["top3"][0]["index"]
    assert np.allclose(both[1]["metal_probability"], alone[0]["metal_probability"], atol=1e-4)


def test_flip_tta_averages_the_mirrored_images_maps(bundle_dir: Path) -> None:
    """``tta="flip"``: each head's output is the mean of the image's and the mirrored image's
    (mapped back); the metal logits show it exactly, the embedding stays the plain image's."""
    plain, flip = ModelBundle.load(bundle_dir), ModelBundle.load(bundle_dir, tta="flip")
    assert flip.card()["tta"] == "flip" and plain.card()["tta"] == "none"
    img = real_image("RG1_UNCR.dcm", BUNDLE_SIZE)  # 64 x 60: resizing to the input commutes with the mirror
    a, m = plain.predict([img, img[:, ::-1].copy()], return_embedding=True)
    f = flip.predict([img], return_embedding=True)[0]

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    mixed = (logit(a["metal_probability"]) + logit(m["metal_probability"])[:, ::-1]) / 2
    assert np.allclose(logit(f["metal_probability"]), mixed, atol=1e-3)
    assert not np.allclose(f["metal_probability"], a["metal_probability"], atol=1e-3)
    assert f["embedding"] == a["embedding"]
    assert abs(sum(f["probabilities"].values()) - 1) < 1e-4 and isinstance(f["screws"], list)
    with pytest.raises(ValueError, match="none, flip, dihedral"):
        ModelBundle.load(bundle_dir, tta="rotate")


def test_screw_mm_uses_row_col_spacing() -> None:
    s = screw_mm({"head": [10.0, 0.0], "tip": [10.0, 20.0]}, (0.5, 2.0))
    assert s["head_mm"] == [20.0, 0.0] and s["tip_mm"] == [20.0, 10.0] and s["length_mm"] == 10.0


def test_bundle_subset_and_errors(tmp_path: Path, bundle_dir: Path) -> None:
    sub = ModelBundle.create(bundle_dir, [bundle_dir / "heads" / "segment"], tmp_path / "seg_only")
    b = ModelBundle.load(sub)
    r = b.predict([real_image("RG3_UNCR.dcm", 80)])[0]
    assert "metal_mask" in r and "top3" not in r and "screws" not in r
    with pytest.raises(ValueError, match="mask_threshold must lie in"):
        ModelBundle.create(bundle_dir, [bundle_dir / "heads" / "segment"], tmp_path / "t", mask_threshold=1.5)
    with pytest.raises(ValueError, match="two segment heads"):
        ModelBundle.create(bundle_dir, [bundle_dir / "heads" / "segment"] * 2, tmp_path / "x")
    other = tmp_path / "other_bb"
    export_backbone(create_backbone("vit_tiny_patch16", img_size=BUNDLE_SIZE), other, BUNDLE_SIZE)
    with pytest.raises(ValueError, match="other backbone weights"):
        ModelBundle.create(other, [bundle_dir / "heads" / "segment"], tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        ModelBundle.load(tmp_path)
    with pytest.raises(ValueError, match="not a torch device"):
        ModelBundle.load(sub, device="tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ModelBundle.load(sub, device="cuda")
    with pytest.raises(ValueError, match="values must lie in"):
        b.predict([np.full((8, 8), 2.0, np.float32)])


def test_bundle_takes_the_heads_tuned_thresholds(tmp_path: Path, bundle_dir: Path) -> None:
    import shutil

    from xrayfm.tasks.train import record_operating_point

    heads = {t: tmp_path / t for t in ("segment", "detect")}
    for t, p in heads.items():
        shutil.copytree(bundle_dir / "heads" / t, p)
    record_operating_point(heads["segment"], {"threshold": 0.35, "min_area": 0.02, "criterion": "dice_mean",
                                              "split": "val"})
    record_operating_point(heads["detect"], {"threshold": 0.42, "criterion": "f1", "split": "val"})
    tuned = ModelBundle.load(ModelBundle.create(bundle_dir, list(heads.values()), tmp_path / "tuned"))
    assert tuned.options == {"detect_threshold": 0.42, "mask_threshold": 0.35, "mask_min_area": 0.02}
    given = ModelBundle.create(bundle_dir, list(heads.values()), tmp_path / "given", detect_threshold=0.6,
                               mask_min_area=0.0)
    assert ModelBundle.load(given).options == {"detect_threshold": 0.6, "mask_threshold": 0.35, "mask_min_area": 0.0}
    untuned = ModelBundle.create(bundle_dir, [bundle_dir / "heads" / "segment"], tmp_path / "untuned")
    assert ModelBundle.load(untuned).options == {"detect_threshold": 0.3, "mask_threshold": 0.5, "mask_min_area": 0.0}
    # the served mask is the probability map at the threshold without components under 2 % of the image
    from xrayfm.tasks.segment import binary_mask

    image = real_image("RG3_UNCR.dcm", 80)
    r_tuned, r_given = tuned.predict([image])[0], ModelBundle.load(given).predict([image])[0]
    np.testing.assert_array_equal(r_tuned["metal_mask"], binary_mask(r_tuned["metal_probability"], 0.35, 0.02))
    np.testing.assert_array_equal(r_given["metal_mask"], r_given["metal_probability"] > 0.35)
    with pytest.raises(ValueError, match="mask_min_area is a fraction of the image area"):
        ModelBundle.create(bundle_dir, list(heads.values()), tmp_path / "bad", mask_min_area=5.0)


def test_image_skip_segment_head_in_training_and_in_the_bundle(bundle_dir: Path) -> None:
    """The bundle's segment head (stride 2, ``image_skip``) gets the same input as in training."""
    from tasks_rods import rod_item

    from xrayfm.tasks.base import get_task
    from xrayfm.tasks.train import load_head_bundle, predict_items

    bundle = ModelBundle.load(bundle_dir)
    head, card = load_head_bundle(bundle_dir.parent / "head_segment")
    assert card["head_kwargs"]["image_skip"] is True and bundle.heads["segment"].image_skip
    items = [rod_item(i, size=BUNDLE_SIZE + 16) for i in range(3)]
    probs = predict_items(bundle.backbone, head, get_task("segment"), items, BUNDLE_SIZE, soft=True)
    served = bundle.predict([it.image for it in items])
    for p, r in zip(probs, served):
        np.testing.assert_allclose(r["metal_probability"], p, atol=1e-5)


def test_resnet_region_head_reads_every_stage_in_training_and_in_the_bundle(tmp_path: Path) -> None:
    from tasks_rods import build_tiny_bundle, rod_item

    from xrayfm.tasks.base import get_task
    from xrayfm.tasks.train import load_head_bundle, predict_items

    bundle = ModelBundle.load(build_tiny_bundle(tmp_path, ("classify",), arch="resnet18"))
    head, card = load_head_bundle(tmp_path / "head_classify")
    assert card["head_kwargs"]["pool"] == "multilevel" and card["train_config"]["pool"] == "multilevel"
    assert head.fc.in_features == sum(bundle.backbone.dense_channels) == 960
    items = [rod_item(i, size=BUNDLE_SIZE + 16) for i in range(3)]
    probs = predict_items(bundle.backbone, head, get_task("classify"), items, BUNDLE_SIZE)
    served = bundle.predict([it.image for it in items])
    for p, r in zip(probs, served):
        np.testing.assert_allclose(list(r["probabilities"].values()), p, atol=1e-5)


def test_bf16_bundle_runs_autocast_and_agrees_with_fp32(bundle_dir: Path) -> None:
    """``precision="bf16"`` runs the forward pass in bf16 (where the CPU has fast bf16) and returns
    float32 results close to the fp32 bundle's: same top region, near-equal metal probabilities."""
    from tasks_rods import rod_item

    from xrayfm.models.runtime import resolve_precision

    exact, fast = ModelBundle.load(bundle_dir), ModelBundle.load(bundle_dir, precision="bf16")
    bf16 = resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert (exact.card()["precision"], fast.card()["precision"]) == ("fp32", "bf16" if bf16 else "fp32")
    dtypes: list[torch.dtype] = []
    fast.backbone.model.patch_embed.proj.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    images = [rod_item(i, size=BUNDLE_SIZE + 16).image for i in range(4)]
    a, b = exact.predict(images, return_embedding=True), fast.predict(images, return_embedding=True)
    assert dtypes == [torch.bfloat16 if bf16 else torch.float32]
    for ra, rb in zip(a, b):
        assert ra["top3"][0]["index"] == rb["top3"][0]["index"]
        assert rb["metal_probability"].dtype == np.float32
        diff = np.abs(ra["metal_probability"] - rb["metal_probability"])
        assert diff.max() < 0.1 and diff.mean() < 0.01
        assert np.corrcoef(ra["embedding"], rb["embedding"])[0, 1] > 0.99
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        ModelBundle.load(bundle_dir, precision="fp16")
