"""The pretraining loop on real radiographs: learning, outputs, exact resume, DDP, export."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_runs import train_two_ranks
from torch.utils.data import IterableDataset
from xray_images import real_xrays

from xrayfm.config import ConfigError
from xrayfm.models import load_backbone
from xrayfm.ssl import PretrainConfig, Trainer, train
from xrayfm.ssl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw: object) -> PretrainConfig:
    base = dict(arch="vit_tiny_patch16", global_size=32, local_size=16, n_local=2, out_dim=64,
                hidden_dim=64, bottleneck_dim=16, batch_size=4, epochs=2, warmup_epochs=0.5,
                num_workers=0, log_every=1, checkpoint_every=100, drop_path_rate=0.1, precision="fp32")
    base.update(kw)
    return PretrainConfig(**base)  # type: ignore[arg-type]


def test_steps_on_a_fixed_batch_reduce_the_loss(tmp_path: Path) -> None:
    items = real_xrays(8)
    trainer = Trainer(tiny_cfg(base_lr=0.05, drop_path_rate=0.0, freeze_last_layer_epochs=0), tmp_path,
                      items, show_progress=False)
    views = [trainer.transform(it["image"], torch.Generator().manual_seed(i))
             for i, it in enumerate(items[:4])]
    batch = trainer.method.collate(views)
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


def test_freeze_patch_embed_keeps_the_random_projection(tmp_path: Path) -> None:
    trainer = Trainer(tiny_cfg(freeze_patch_embed=True, freeze_last_layer_epochs=0), tmp_path, real_xrays(8),
                      show_progress=False)
    student = trainer.method.student.backbone.model
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.fit()
    after = student.state_dict()
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert torch.equal(after["patch_embed.proj.bias"], before["patch_embed.proj.bias"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    teacher = trainer.method.trained_backbone().model.state_dict()
    assert torch.equal(teacher["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    with pytest.raises(ConfigError, match="freeze_patch_embed applies to ViT"):
        Trainer(tiny_cfg(arch="resnet18", freeze_patch_embed=True), tmp_path / "r", real_xrays(8),
                show_progress=False)


def test_fit_writes_run_folder_and_exports_backbone(tmp_path: Path) -> None:
    trainer = Trainer(tiny_cfg(), tmp_path, real_xrays(8), show_progress=False)
    summary = trainer.fit()
    assert summary.steps == summary.total_steps == 4 and math.isfinite(summary.loss)
    for name in ("config.yaml", "run.json", "checkpoint.pth", "metrics.jsonl", "backbone.safetensors",
                 "model_card.json"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "momentum", "teacher_entropy", "kl", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[-1]["momentum"] == pytest.approx(1.0)
    model, card = load_backbone(str(tmp_path))
    assert card["method"] == "dino" and card["training_data"]["n_images"] == 8 and card["finished"]
    x = real_xrays(1, 32)[0]["image"][None]
    teacher = trainer.method.trained_backbone().eval()
    with torch.no_grad():
        assert torch.allclose(model(x), teacher(x), atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"dense_weight": 1.0}], ids=["dino", "dino+dense"])
def test_resume_continues_to_the_same_weights(tmp_path: Path, extra: dict[str, float]) -> None:
    items = real_xrays(12)  # 3 steps per epoch: the "crash" at step 2 is mid-epoch
    straight = train(tiny_cfg(max_steps=4, **extra), tmp_path / "a", items, show_progress=False)
    train(tiny_cfg(max_steps=2, **extra), tmp_path / "b", items, show_progress=False)
    resumed = train(tiny_cfg(max_steps=4, **extra), tmp_path / "b", items, resume=True, show_progress=False)
    assert straight.steps == resumed.steps == 4 and resumed.resumed_from == 2
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pth")
    assert (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"]) == (1, 1)
    for key, value in a["method"].items():
        assert torch.allclose(value, b["method"][key], atol=1e-6, rtol=0), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    if extra:
        assert a["method"]["dense_criterion.center"].abs().sum() > 0
        logged = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
        assert logged["dense_matched"] > 0 and math.isfinite(logged["dense_loss"])
    again = train(tiny_cfg(max_steps=4, **extra), tmp_path / "b", items, show_progress=False)  # nothing left to do
    assert again.steps == 4 and again.loss == pytest.approx(resumed.loss)
    with pytest.raises(ConfigError, match="out_dim"):
        train(tiny_cfg(out_dim=32, max_steps=5), tmp_path / "b", items, show_progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny_cfg(), tmp_path / "c", items, resume=True, show_progress=False)


def test_max_steps_zero_exports_the_initial_weights(tmp_path: Path) -> None:
    """``--max-steps 0`` is how the random-init baseline is made: same seed, same weights,
    and different from the weights after a few steps."""
    items = real_xrays(8)
    for name, steps in (("a", 0), ("b", 0), ("c", 3)):  # step 0 has lr 0 (warm-up)
        train(tiny_cfg(max_steps=steps), tmp_path / name, items, show_progress=False)
    weights = {n: load_backbone(str(tmp_path / n))[0].state_dict() for n in "abc"}
    assert json.loads((tmp_path / "a" / "model_card.json").read_text())["steps"] == 0
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_resnet18_bf16_steps_are_finite(tmp_path: Path) -> None:
    cfg = tiny_cfg(arch="resnet18", global_size=64, local_size=32, precision="auto", max_steps=2)
    trainer = Trainer(cfg, tmp_path, real_xrays(8), show_progress=False)
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    assert trainer.amp_dtype == expected
    summary = trainer.fit()
    assert summary.steps == 2 and math.isfinite(summary.loss)
    _, card = load_backbone(str(tmp_path))
    assert card["dense_strides"] == [4, 8, 16, 32] and not card["finished"]


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path: Path) -> None:
    r0, r1 = train_two_ranks(tiny_cfg(max_steps=2), tmp_path)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert ckpt["world"] == 2 and ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    # each rank saw different images, so the all-reduced centre differs from one rank's own mean
    assert r0["criterion.center"].abs().sum() > 0


class _Stream(IterableDataset):
    """An iterable source without len(), like a remote stream."""

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from self.items


def test_iterable_source_without_len(tmp_path: Path) -> None:
    items = real_xrays(8)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        Trainer(tiny_cfg(), tmp_path / "a", _Stream(items), show_progress=False)
    summary = train(tiny_cfg(steps_per_epoch=2, epochs=1), tmp_path / "b", _Stream(items),
                    show_progress=False)
    assert summary.steps == 2 and math.isfinite(summary.loss)
    with pytest.raises(ConfigError, match="data ended after 2 batches"):
        train(tiny_cfg(steps_per_epoch=3, epochs=1), tmp_path / "c", _Stream(items), show_progress=False)


def test_monitor_runs_on_the_trained_backbone_after_each_epoch(tmp_path: Path) -> None:
    items = real_xrays(8)
    x = real_xrays(2, 32)[0]["image"][None]
    seen: list[bool] = []

    def monitor(backbone: torch.nn.Module) -> dict[str, float]:
        seen.append(backbone.training)
        return {"feature_norm": float(backbone(x).norm())}

    trainer = Trainer(tiny_cfg(epochs=3), tmp_path, items, show_progress=False, monitor=monitor)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(2, 1), (4, 2), (6, 3)]
    assert seen == [False, False, False] and trainer.method.training  # eval for the monitor, train after
    assert all(math.isfinite(r["feature_norm"]) and r["feature_norm"] > 0 for r in records)


def test_checkpoint_older_than_a_config_key_resumes_with_its_default(tmp_path: Path) -> None:
    from xrayfm.ssl.checkpoint import save_checkpoint

    items = real_xrays(8)
    train(tiny_cfg(max_steps=1), tmp_path, items, show_progress=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    del ckpt["config"]["koleo_weight"]  # as written before the key existed
    save_checkpoint(tmp_path / "checkpoint.pth", ckpt)
    assert train(tiny_cfg(max_steps=2), tmp_path, items, show_progress=False).resumed_from == 1
    with pytest.raises(ConfigError, match="koleo_weight"):
        train(tiny_cfg(max_steps=3, koleo_weight=0.1), tmp_path, items, show_progress=False)


def test_compiled_backbones_train_like_eager(tmp_path: Path) -> None:
    items = real_xrays(4)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(arch="resnet18", compile=compiled, drop_path_rate=0.0)
        trainer = Trainer(cfg, tmp_path / str(compiled), items, show_progress=False)
        views = [trainer.transform(it["image"], torch.Generator().manual_seed(i))
                 for i, it in enumerate(items)]
        batch = trainer.method.collate(views)
        runs[compiled] = [trainer.train_step(batch)["loss"] for _ in range(2)]
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4)
