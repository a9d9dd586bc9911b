"""Numerical guards of the pretraining loop (issue #4: NaN weights under CPU bf16 at tiny crops).

* :func:`guard_tiny_strided_convs`: on the CPU, oneDNN's bf16 convolution backward returns
  uninitialised memory as the *weight gradient* of a strided convolution whose input is
  narrower than its stride (ResNet-18's ``layer4.0.conv1`` on a 16-px crop sees a 1x1 map):
  values up to 1e30, sometimes inf or NaN, different on every call. The forward pass and the
  input gradient are correct, so the loss stays finite while AdamW writes NaN into the
  weights. Such convolutions run in fp32; they cost next to nothing on maps this small.
* :class:`NonFiniteGuard`: a step whose gradients are still non-finite is skipped (counted and
  warned about); ``max_consecutive`` such steps in a row stop training with a one-line error.
* :func:`check_state_finite`: the trainer's state is checked before every checkpoint (and so
  before the export) so that NaN weights are never written.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _tiny_for_stride(conv: nn.Conv2d, x: Tensor) -> bool:
    """True when a strided spatial dim of ``x`` is narrower than the stride or yields one output."""
    pads = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "same" implies stride 1
    for size, k, s, p, d in zip(x.shape[-2:], conv.kernel_size, conv.stride, pads, conv.dilation):
        if s > 1 and (size < s or (size + 2 * p - d * (k - 1) - 1) // s == 0):
            return True
    return False


class TinyMapSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that leaves CPU autocast (runs in fp32) on inputs :func:`_tiny_for_stride` flags.

    The output is cast back to the autocast dtype, so the layers after it see what they saw.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not _tiny_for_stride(self, x):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            bias = None if self.bias is None else self.bias.float()
            out = self._conv_forward(x.float(), self.weight.float(), bias)
        return out.to(dtype)


def guard_tiny_strided_convs(module: nn.Module) -> int:
    """Turn every strided ``nn.Conv2d`` in ``module`` into a :class:`TinyMapSafeConv2d` in place
    (same parameters and state-dict keys); returns how many were changed."""
    changed = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and max(m.stride) > 1:
            m.__class__ = TinyMapSafeConv2d
            changed += 1
    return changed


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_state_finite(state: Mapping[str, Tensor], step: int) -> None:
    """Raise ``FloatingPointError`` naming the first non-finite tensor of ``state``. Under
    torch.distributed every rank raises together (buffers such as the teacher's BatchNorm
    statistics differ between ranks), so none is left waiting in a collective."""
    bad = first_non_finite(state)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(bad is not None)], device=next(iter(state.values())).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = bad or ("a tensor of another rank" if flag.item() else None)
    if bad is not None:
        raise FloatingPointError(f"{bad} is non-finite at step {step}; nothing written. Lower base_lr or "
                                 "clip_grad, or use --precision fp32")


def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient is finite (one fused norm; a NaN or inf anywhere makes it non-finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads, foreach=True)))


class NonFiniteGuard:
    """Counts skipped steps; raises after ``max_consecutive`` non-finite steps in a row."""

    def __init__(self, max_consecutive: int = 3) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, finite: bool, step: int) -> bool:
        """Record one step; True when it may be applied, False when it must be skipped."""
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"non-finite gradients in {self.consecutive} consecutive steps (up to step {step}, "
                f"{self.skipped} skipped in all); training diverged: lower base_lr or clip_grad, or use "
                "--precision fp32")
        warnings.warn(f"non-finite gradients at step {step}: step skipped ({self.skipped} so far)", stacklevel=3)
        return False
