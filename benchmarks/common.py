"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from xrayfm.models import create_backbone, load_backbone


def backbone_from_spec(spec: str) -> tuple[str, torch.nn.Module]:
    """``NAME=PATH`` or ``PATH`` (a pretrain run / exported bundle) or ``random:ARCH`` (random
    init, seed 0); returns (label, backbone)."""
    if spec.startswith("random:"):
        torch.manual_seed(0)
        return spec, create_backbone(spec.split(":", 1)[1])
    name, _, path = spec.partition("=")
    return (name if path else Path(spec).name), load_backbone(path or spec)[0]
