"""Where and in what precision models run: device and autocast dtype from a config string."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from xrayfm.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# what heads and bundles offer: fp16 would need loss scaling (training) and a GPU
AUTOCAST_PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(requested: str) -> torch.device:
    """``"auto"``: the current CUDA device when there is one, else the CPU; otherwise any torch
    device string ("cpu", "cuda", "cuda:1")."""
    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {requested!r} is not a torch device; use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for but CUDA is not available; use auto or cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {requested!r} is not supported; use auto, cpu or cuda")
    return dev


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. "auto": bf16 on CUDA and on a CPU with fast bf16 (AMX/AVX-512).

    On the CPU, ViT attention cores stay fp32 (``AutocastAttention``), which makes bf16 pay for
    ViTs too (measured in docs/pretrain.md).
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    cpu_bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if requested == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return torch.float16
    if requested == "bf16":
        if device.type == "cpu" and not cpu_bf16:
            warnings.warn("this CPU has no fast bf16; falling back to fp32", stacklevel=2)
            return None
        return torch.bfloat16
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16 else None
    return None


def resolve_bf16(requested: str, device: torch.device) -> torch.dtype | None:
    """bf16 or None (fp32) for one of :data:`AUTOCAST_PRECISIONS`: what heads and bundles run in.
    "auto" on a GPU without bf16 gives fp32, not fp16 (which would need loss scaling)."""
    if requested not in AUTOCAST_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(AUTOCAST_PRECISIONS)}, got {requested!r}")
    amp = resolve_precision(requested, device)
    return amp if amp == torch.bfloat16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for an empty module."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
