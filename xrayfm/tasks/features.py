"""Feature cache: the frozen backbone runs once over the images; heads then train on the cache.

Pooled embeddings ``(N, D)`` or dense maps ``[(N, C_i, h_i, w_i)]`` are kept in float16 (half
the memory of float32; the heads compute in float32). A cache saves to one safetensors file
(tensors ``f0, f1, ...`` and metadata ``kind``, ``image_ids`` and the caller's ``info``), written
atomically.

Trade-off: with the cache an epoch costs only the head's forward/backward (the backbone, by far
the larger network, runs once), but every epoch sees the same pixels: no random geometric
augmentation and no fine-tuning. Training with ``augment`` or ``unfreeze`` runs the backbone
every step; ``dihedral`` on the cache caches the 8 rotations/mirrors of every image (8x memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from xrayfm.config import atomic_write_bytes
from xrayfm.models.runtime import module_device

KINDS = ("pooled", "dense")


@dataclass
class FeatureCache:
    """Backbone outputs for a list of images, row ``i`` belonging to ``image_ids[i]``."""

    kind: str
    feats: list[torch.Tensor]
    image_ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def batch(self, idx: torch.Tensor | np.ndarray | list[int],
              device: torch.device | str = "cpu") -> torch.Tensor | list[torch.Tensor]:
        """Rows ``idx`` as float32 on ``device``: a tensor (pooled) or a list of maps (dense)."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        rows = [f[i].to(device, non_blocking=True).float() for f in self.feats]
        return rows[0] if self.kind == "pooled" else rows

    def save(self, path: str | Path) -> None:
        tensors = {f"f{i}": f.contiguous() for i, f in enumerate(self.feats)}
        meta = {"kind": self.kind, "image_ids": json.dumps(self.image_ids), "info": json.dumps(self.info)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> FeatureCache:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"feature cache {p} does not exist; build it with compute_features")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") not in KINDS:
                raise ValueError(f"{p} is not an xrayfm feature cache (no kind in its metadata)")
            feats = [f.get_tensor(f"f{i}") for i in range(len(list(f.keys())))]
        return cls(meta["kind"], feats, json.loads(meta["image_ids"]), json.loads(meta.get("info", "{}")))


def backbone_features(backbone: torch.nn.Module, images: torch.Tensor, kind: str,
                      pool: str = "final", image: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """One backbone call: the pooled embedding ``pool`` ``(B, D)`` or the list of dense maps
    (followed by the backbone-normalised ``images`` when ``image``: heads with ``image_skip``)."""
    if kind == "pooled":
        # "final" is a plain call, so wrapped backbones (DDP, torch.compile) work as before
        return backbone.forward_pooled(images, pool) if pool != "final" else backbone(images)
    if kind == "dense":
        maps = list(backbone.forward_dense(images))
        return maps + [backbone.normalise(images)] if image else maps
    raise ValueError(f"feature kind {kind!r} is not one of {KINDS}")


@torch.no_grad()
def compute_features(backbone: torch.nn.Module, images: Iterable[tuple[str, torch.Tensor]], kind: str,
                     info: dict[str, Any] | None = None,
                     progress: Callable[[int], None] | None = None, pool: str = "final",
                     image: bool = False) -> FeatureCache:
    """Run ``backbone`` (eval mode, on its own device) over batches ``(ids, (B, 1, H, W) in [0,1])``
    into a cache in CPU memory (pooled caches hold the embedding ``pool``, dense ones the maps and,
    with ``image``, the normalised input last: :func:`backbone_features`).

    ``progress(n)`` is called with the number of images done in each batch.
    """
    was_training = backbone.training
    backbone.eval()
    device = module_device(backbone)
    ids: list[str] = []
    chunks: list[list[torch.Tensor]] = []
    try:
        for batch_ids, x in images:
            out = backbone_features(backbone, x.to(device), kind, pool, image)
            maps = [out] if kind == "pooled" else out
            chunks.append([m.detach().to("cpu", torch.float16) for m in maps])
            ids += list(batch_ids)
            if progress is not None:
                progress(len(batch_ids))
    finally:
        backbone.train(was_training)
    if not chunks:
        raise ValueError("no images to compute features for; check the split / label join")
    feats = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
    return FeatureCache(kind, feats, ids, dict(info or {}))


def batched(ids: list[str], images: torch.Tensor, batch_size: int) -> Iterable[tuple[list[str], torch.Tensor]]:
    """``(ids, images)`` in batches of ``batch_size``."""
    for i in range(0, len(ids), batch_size):
        yield ids[i:i + batch_size], images[i:i + batch_size]
