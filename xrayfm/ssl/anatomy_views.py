"""Views of the anatomy-aware method: coarse-to-fine windows, their parts, and the stage schedule.

At granularity ``g`` a window of ``H // 2**g`` x ``W // 2**g`` pixels is cut at a random position
inside the image; its parts are the cells of a ``rows x cols`` grid over the window (default
2 x 2, the quadrants). Cell edges are rounded integer fractions of the window, so the parts
tile the window exactly (no overlap, no gap) for odd sizes too.

Geometry conventions follow :mod:`xrayfm.conventions`: boxes are ``(top, left, height, width)``
in pixels of the ``(1, H, W)`` image, rows first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xrayfm.config import ConfigError
from xrayfm.ssl.augment import Pipeline, RandomFlip, RandomResizedCrop
from xrayfm.ssl.multicrop import AugmentConfig, photometric

Box = tuple[int, int, int, int]  # top, left, height, width


@dataclass
class AnatomyConfig:
    """Settings of ``method: anatomy`` (the ``anatomy:`` block of a pretrain config)."""

    schedule: str = "staged"                    # staged | random
    granularities: tuple[int, ...] = (0, 1, 2)  # window side = image side / 2**g, coarse to fine
    parts_grid: tuple[int, int] = (2, 2)        # rows, cols of parts per window
    part_size: int | None = None                # px of each part view; None = local_size
    localizability_weight: float = 1.0
    composability_weight: float = 1.0
    decomposability_weight: float = 1.0
    mlp_hidden_dim: int = 1024                  # hidden width of the compose / decompose MLPs

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad ``anatomy.*`` key."""
        if self.schedule not in ("staged", "random"):
            raise ConfigError(f"anatomy.schedule must be 'staged' or 'random', got {self.schedule!r}")
        if not self.granularities or any(int(g) != g or g < 0 for g in self.granularities):
            raise ConfigError(f"anatomy.granularities must be a non-empty list of integers >= 0, "
                              f"got {list(self.granularities)}")
        if len(self.parts_grid) != 2 or min(self.parts_grid) < 1 or self.parts_grid[0] * self.parts_grid[1] < 2:
            raise ConfigError(f"anatomy.parts_grid must be [rows, cols] with at least 2 parts, "
                              f"got {list(self.parts_grid)}")
        if self.part_size is not None and self.part_size <= 0:
            raise ConfigError(f"anatomy.part_size must be positive or null, got {self.part_size}")
        for key in ("localizability_weight", "composability_weight", "decomposability_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"anatomy.{key} must be >= 0, got {getattr(self, key)}")
        if self.mlp_hidden_dim <= 0:
            raise ConfigError(f"anatomy.mlp_hidden_dim must be positive, got {self.mlp_hidden_dim}")

    @property
    def n_parts(self) -> int:
        return self.parts_grid[0] * self.parts_grid[1]


def window_size(height: int, width: int, granularity: int) -> tuple[int, int]:
    """``(H // 2**g, W // 2**g)``: the window side at granularity ``g``."""
    return height >> granularity, width >> granularity


def random_window(height: int, width: int, granularity: int, g: torch.Generator) -> Box:
    """A window of granularity ``granularity`` at a uniformly random position inside the image."""
    wh, ww = window_size(height, width, granularity)
    if wh < 1 or ww < 1:
        raise ValueError(f"a {height}x{width} image has no granularity-{granularity} window; "
                         "use larger images or smaller anatomy.granularities")
    top = int(torch.randint(0, height - wh + 1, (), generator=g))
    left = int(torch.randint(0, width - ww + 1, (), generator=g))
    return top, left, wh, ww


def part_boxes(window: Box, grid: tuple[int, int] = (2, 2)) -> list[Box]:
    """The window's parts, row-major: cells with edges at ``round(i * side / n)``."""
    top, left, h, w = window
    rows, cols = grid
    if h < rows or w < cols:
        raise ValueError(f"a {h}x{w} window cannot be split into a {rows}x{cols} grid of parts; "
                         "use larger images or smaller anatomy.granularities")
    ys = [top + round(i * h / rows) for i in range(rows + 1)]
    xs = [left + round(j * w / cols) for j in range(cols + 1)]
    return [(ys[i], xs[j], ys[i + 1] - ys[i], xs[j + 1] - xs[j]) for i in range(rows) for j in range(cols)]


def crop(img: Tensor, box: Box) -> Tensor:
    top, left, h, w = box
    return img[:, top:top + h, left:left + w]


def resize(img: Tensor, size: int) -> Tensor:
    """``(1, h, w)`` -> ``(1, size, size)``, antialiased bilinear."""
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def staged_granularity(epoch: int, epochs: int, granularities: Sequence[int]) -> int:
    """Granularity of ``epoch`` when the epochs are split evenly into stages, coarse to fine."""
    stage = min(len(granularities) - 1, epoch * len(granularities) // max(1, epochs))
    return int(granularities[stage])


class AnatomyTransform:
    """Views of one ``(1, H, W)`` image for the anatomy method.

    * ``global`` (2, 1, G, G): view 0 is the whole window resized (the "whole" of the part
      losses), view 1 a random resized crop of it (``global_scale``), both photometrically
      augmented as in DINO;
    * ``local`` (n_local, 1, L, L): random resized crops of the window (``local_scale``);
    * ``parts`` (n_parts, 1, S, S): the window's parts, row-major, each resized to S;
    * ``granularity``: the ``g`` used (a 0-d tensor, for logging).

    With ``schedule == "staged"`` the granularity is :attr:`granularity` (set per epoch by the
    method); with ``"random"`` every image draws its own from ``granularities``.
    """

    def __init__(self, cfg: AnatomyConfig, global_size: int, local_size: int, n_local: int,
                 global_scale: tuple[float, float], local_scale: tuple[float, float],
                 aug: AugmentConfig | None = None) -> None:
        a = aug or AugmentConfig()
        self.cfg, self.n_local = cfg, n_local
        self.global_size = global_size
        self.part_size = cfg.part_size or local_size
        self.granularity = int(cfg.granularities[0])
        self.flip = RandomFlip(a.flip_p, a.vflip_p)
        self.whole_view = Pipeline(photometric(a, 0.5, 0.0))
        self.crop_view = Pipeline([RandomResizedCrop(global_size, global_scale), *photometric(a, 0.1, a.solarize_p)])
        self.local_view = Pipeline([RandomResizedCrop(local_size, local_scale), *photometric(a, 0.5, 0.0)])
        self.part_view = Pipeline(photometric(a, 0.5, 0.0))

    def pick_granularity(self, g: torch.Generator) -> int:
        if self.cfg.schedule == "random":
            return int(self.cfg.granularities[int(torch.randint(len(self.cfg.granularities), (), generator=g))])
        return self.granularity

    def __call__(self, img: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        gran = self.pick_granularity(g)
        _, h, w = img.shape
        box = random_window(h, w, gran, g)
        window = self.flip(crop(img, box), g)
        local_box = (0, 0, box[2], box[3])
        parts = [resize(crop(window, b), self.part_size) for b in part_boxes(local_box, self.cfg.parts_grid)]
        glob = torch.stack([self.whole_view(resize(window, self.global_size), g), self.crop_view(window, g)])
        loc = (torch.stack([self.local_view(window, g) for _ in range(self.n_local)])
               if self.n_local else torch.empty(0))
        return {"global": glob, "local": loc, "parts": torch.stack([self.part_view(p, g) for p in parts]),
                "granularity": torch.tensor(gran)}


def collate_anatomy(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack crop-major, as :func:`xrayfm.ssl.multicrop.collate_crops`: ``global`` (2B, ...) is
    every image's view 0 then view 1; ``parts`` (P*B, ...) part 0 of every image, then part 1..."""
    out = {}
    for key in ("global", "local", "parts"):
        stacked = torch.stack([it[key] for it in items], dim=1)
        out[key] = stacked.flatten(0, 1) if stacked.numel() else torch.empty(0)
    out["granularity"] = torch.stack([it["granularity"] for it in items]).float()
    return out
