"""Issue #4: NaN weights in DINO ResNet-18 pretraining under CPU bf16 at 32/16-px crops.

Root cause: oneDNN's bf16 convolution backward returns uninitialised memory as the weight
gradient of a strided convolution whose input is narrower than its stride (ResNet-18's
``layer4.0.conv1`` sees a 1x1 map on a 16-px crop). These tests drive the real trainer.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from xray_images import real_xrays

from xrayfm.ssl import PretrainConfig, Trainer
from xrayfm.ssl.registry import Progress

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw: object) -> PretrainConfig:
    base: dict[str, object] = {
        "arch": "resnet18", "global_size": 32, "local_size": 16, "n_local": 2, "out_dim": 32, "hidden_dim": 64,
        "bottleneck_dim": 16, "batch_size": 4, "epochs": 2, "warmup_epochs": 0.5, "num_workers": 0,
        "log_every": 1, "checkpoint_every": 100, "drop_path_rate": 0.0, "precision": "fp32"}
    base.update(kw)
    return PretrainConfig(**base)  # type: ignore[arg-type]


def _student_grads(trainer: Trainer, batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Student gradients of one DINO loss on ``batch``; the allocator is first filled with freed NaNs,
    which is what uninitialised memory read by a faulty kernel would then hold."""
    junk = [torch.full((1 << 20,), float("nan")) for _ in range(8)]
    del junk
    student = trainer.method.student
    student.zero_grad(set_to_none=True)
    centre = trainer.method.criterion.center.clone()
    loss, _ = trainer._forward(batch, Progress(0, 0, trainer.steps_per_epoch, trainer.total_steps), dtype)
    trainer.method.criterion.center.copy_(centre)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}


def test_bf16_gradients_on_16px_crops_are_finite_and_match_fp32(tmp_path: Path) -> None:
    """Before the fix layer4.0.conv1's weight gradient held values up to 1e30, inf or NaN."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no fast bf16, so the trainer runs fp32 and the oneDNN bf16 kernel is never used")
    items = real_xrays(4)
    trainer = Trainer(_cfg(precision="bf16"), tmp_path, items, show_progress=False)
    views = [trainer.transform(it["image"], torch.Generator().manual_seed(i)) for i, it in enumerate(items)]
    batch = trainer.method.collate(views)
    trainer.method.train()
    # timm zero-initialises each block's last BatchNorm scale, so no gradient reaches the faulty
    # convolution before the first update; scales of 1 stand for a run some steps in
    for name, p in trainer.method.student.named_parameters():
        if name.endswith("bn2.weight"):
            p.data.fill_(1.0)
    ref = _student_grads(trainer, batch, None)
    for _ in range(3):  # the faulty kernel's output changed from call to call
        low = _student_grads(trainer, batch, torch.bfloat16)
        for name, g in ref.items():
            assert torch.isfinite(low[name]).all(), name
            # bf16 moves these gradients by up to ~0.5 of their norm here; the garbage was >= 100x
            err = (low[name] - g).norm() / (g.norm() + 1e-8)
            assert err < 1.0, (name, float(err))
        # On a 1x1 (local) or 2x2 (global) input, the 3x3 stride-2 kernel's first row and column
        # only ever see zero padding: their gradient is exactly 0 (before the fix: garbage, always)
        w = low["backbone.model.layer4.0.conv1.weight"]
        padding_only = torch.cat([w[:, :, 0, :].flatten(), w[:, :, :, 0].flatten()])
        assert float(padding_only.abs().max()) == 0.0


def test_non_finite_gradients_skip_the_step_then_stop_training(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(warmup_epochs=0.0), tmp_path, real_xrays(16), show_progress=False)
    target = trainer.method.student.backbone.model.layer4[0].conv1.weight
    poisoned = {"steps": 1}

    def poison(grad: torch.Tensor) -> torch.Tensor:  # what the faulty kernel returned
        if poisoned["steps"] > 0:
            poisoned["steps"] -= 1
            return grad * float("inf")
        return grad

    target.register_hook(poison)
    before = target.detach().clone()
    items = [trainer.transform(it["image"], torch.Generator().manual_seed(i)) for i, it in enumerate(real_xrays(4))]
    batch = trainer.method.collate(items)
    with pytest.warns(UserWarning, match="non-finite gradients at step 0: step skipped"):
        stats = trainer.train_step(batch)
    assert stats["skipped_steps"] == 1 and math.isfinite(stats["loss"]) and trainer.step == 1
    assert torch.equal(target, before)  # nothing was applied
    stats = trainer.train_step(batch)
    assert stats["skipped_steps"] == 1 and not torch.equal(target, before)
    assert all(torch.isfinite(p).all() for p in trainer.method.parameters())
    poisoned["steps"] = 3
    for n in (2, 3):
        with pytest.warns(UserWarning, match=f"step skipped \\({n} so far\\)"):
            trainer.train_step(batch)
    with pytest.raises(FloatingPointError, match="non-finite gradients in 3 consecutive steps"):
        trainer.train_step(batch)


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path: Path) -> None:
    """A NaN that the loss does not see (a teacher BatchNorm running variance) stops the run
    before anything is written; the exported backbone would have given NaN features in eval mode."""
    trainer = Trainer(_cfg(max_steps=1), tmp_path, real_xrays(8), show_progress=False)
    trainer.method.teacher.backbone.model.bn1.running_var[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"teacher\.backbone\.model\.bn1\.running_var is non-finite"):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pth").exists() and not (tmp_path / "backbone.safetensors").exists()
