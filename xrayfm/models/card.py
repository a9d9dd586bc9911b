"""Backbone bundles: ``backbone.safetensors`` + ``model_card.json``, and :func:`load_backbone`.

The weights file holds the timm model's state dict (keys exactly as timm names them, one input
channel), so it also loads into ``timm.create_model(name, in_chans=1, num_classes=0)``. The card
says everything a consumer needs to feed the model correctly.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from xrayfm.config import atomic_write_bytes, atomic_write_text, versions
from xrayfm.conventions import PIXEL_MEAN, PIXEL_STD
from xrayfm.models.backbones import Backbone, create_backbone

WEIGHTS_NAME = "backbone.safetensors"
CARD_NAME = "model_card.json"
CARD_VERSION = 1
INTENSITY_CONVENTION = (
    "input (B, 1, H, W) float in [0, 1], dense tissue bright (MONOCHROME2 display); the model "
    f"normalises internally: input_norm 'fixed' with mean {PIXEL_MEAN} and std {PIXEL_STD}, "
    "'equalize' by histogram-equalising each image"
)


def export_backbone(backbone: Backbone, out_dir: str | Path, img_size: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` and ``model_card.json`` into ``out_dir``; return the card path.

    ``extra`` adds card fields such as ``method``, ``training_data``, ``config`` and ``metrics``.
    """
    from safetensors.torch import save

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    blob = save(state)
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "arch": backbone.arch,
        "in_chans": 1,
        "intensity_convention": INTENSITY_CONVENTION,
        "pixel_mean": PIXEL_MEAN,
        "pixel_std": PIXEL_STD,
        "input_norm": backbone.input_norm,
        "input_size": img_size,
        "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim,
        "dense_channels": backbone.dense_channels,
        "dense_strides": backbone.dense_strides,
        "weights": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        **(extra or {}),
    }
    card_path = out / CARD_NAME
    atomic_write_text(card_path, json.dumps(card, indent=2, default=str))
    return card_path


def load_backbone(path: str) -> tuple[Backbone, dict[str, Any]]:
    """Load an exported backbone from a pretrain run folder or bundle folder; return (model, card).

    ``path`` may also name the ``model_card.json`` or ``backbone.safetensors`` file itself. The
    model is returned in eval mode on the CPU.
    """
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.is_file() else p
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CARD_NAME}; pass a pretrain run folder or an exported bundle folder"
        )
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{card_path} is not valid JSON ({exc}); re-export the backbone") from exc
    for key in ("arch", "input_size", "weights"):
        if key not in card:
            raise ValueError(f"{card_path} lacks the key {key!r}; re-export the backbone")
    weights = folder / card["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} named by {card_path} does not exist; re-export the backbone")
    backbone = create_backbone(card["arch"], img_size=int(card["input_size"]),
                               input_norm=card.get("input_norm", "fixed"))
    state = load_file(str(weights))
    try:
        backbone.model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"{weights} does not match arch {card['arch']} ({first}); re-export it") from exc
    return backbone.eval(), card
