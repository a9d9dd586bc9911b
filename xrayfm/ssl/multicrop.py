"""Multi-crop views (2 global + N local) and the datasets that make them deterministically.

A sample's crops are a pure function of ``(seed, epoch, position in the epoch)``: the
generator for each sample is seeded from those three numbers. Resuming therefore needs no
augmentation RNG state, and the number of data workers does not change the result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from xrayfm.ssl.augment import (
    Collimation,
    GaussianBlur,
    InvertPolarity,
    Pipeline,
    QuantumNoise,
    RandomContrastBrightness,
    RandomFlip,
    RandomGamma,
    RandomResizedCrop,
    RandomRotation,
    RandomWindowLevel,
    Solarize,
    XrayTransform,
    source_coordinates,
)


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the X-ray view pipeline (see docs/pretrain.md)."""

    flip_p: float = 0.5
    vflip_p: float = 0.0
    rotate_p: float = 0.5
    rotate_degrees: float = 10.0
    window_p: float = 0.8
    gamma_p: float = 0.8
    contrast_p: float = 0.8
    noise_p: float = 0.5
    invert_p: float = 0.02
    solarize_p: float = 0.2
    collimation_p: float = 0.3


def photometric(a: AugmentConfig, blur_p: float, solarize_p: float) -> list[XrayTransform]:
    """The view pipeline after its flips and rotations: window/level, gamma, contrast, blur,
    solarisation, noise, polarity and collimation, in that order.

    :class:`MultiCropTransform` puts a flip and a rotation before it; the anatomy method
    (:mod:`xrayfm.ssl.anatomy_views`) flips once per window instead, so parts keep their place.
    """
    return [
        RandomWindowLevel(p=a.window_p),
        RandomGamma(p=a.gamma_p),
        RandomContrastBrightness(p=a.contrast_p),
        GaussianBlur(p=blur_p),
        Solarize(p=solarize_p),
        QuantumNoise(p=a.noise_p),
        InvertPolarity(p=a.invert_p),
        Collimation(p=a.collimation_p),
    ]


def sample_seed(seed: int, epoch: int, key: int | str) -> int:
    """A 63-bit seed for one sample, decorrelated across (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MultiCropTransform:
    """DINO-style views of one ``(1, H, W)`` image: 2 global crops and ``n_local`` local crops.

    Global view 1 is always blurred, view 2 rarely blurred but sometimes solarised; local views
    are blurred half of the time (the asymmetry of the DINO recipe). With ``coords`` the global
    views also come with where their pixels lie in the image (:func:`source_coordinates`), which
    the patch-level loss needs to pair positions across views.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4),
                 aug: AugmentConfig | None = None, coords: bool = False) -> None:
        a = aug or AugmentConfig()
        self.n_local, self.coords = n_local, coords

        def augment(blur_p: float, solarize_p: float) -> list[XrayTransform]:
            return [
                RandomFlip(a.flip_p, a.vflip_p),
                RandomRotation(a.rotate_degrees, p=a.rotate_p),
                *photometric(a, blur_p, solarize_p),
            ]

        self.global_views = [
            Pipeline([RandomResizedCrop(global_size, global_scale), *augment(1.0, 0.0)]),
            Pipeline([RandomResizedCrop(global_size, global_scale), *augment(0.1, a.solarize_p)]),
        ]
        self.local_view = Pipeline([RandomResizedCrop(local_size, local_scale), *augment(0.5, 0.0)])

    def __call__(self, img: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """Return ``{"global": (2, 1, G, G), "local": (n_local, 1, L, L)}``, with ``coords`` also
        ``"global_coords": (2, 3, G, G)``."""
        views, coords = [], []
        for view in self.global_views:
            if self.coords:
                coords.append(source_coordinates(view, img.shape[-2:], g))
            views.append(view(img, g))
        loc = (torch.stack([self.local_view(img, g) for _ in range(self.n_local)])
               if self.n_local else torch.empty(0))
        out = {"global": torch.stack(views), "local": loc}
        if self.coords:
            out["global_coords"] = torch.stack(coords)
        return out


def _image_of(item: Any, where: str) -> Tensor:
    img = item.get("image") if isinstance(item, dict) else None
    if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 1:
        raise ValueError(f"{where}: items must be dicts with 'image' a (1, H, W) float tensor in [0, 1]")
    return img.float()


class EpochSampler(Sampler[tuple[int, int]]):
    """Deterministic shuffled order per epoch, sharded over ranks, skipping consumed samples.

    Yields ``(index, seed)``: the seed of a sample's views depends on its place in the global
    epoch order, so it does not depend on ranks, workers or where a run was resumed.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and drop this rank's first ``skip`` samples."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, "order"))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world
        positions = range(self.rank, per_rank * self.world, self.world)
        for pos in list(positions)[self.skip:]:
            yield order[pos], sample_seed(self.seed, self.epoch, pos)


class MultiCropMapDataset(Dataset):
    """Map-style source -> multi-crop views, indexed by the ``(index, seed)`` pairs of ``EpochSampler``."""

    def __init__(self, source: Dataset, transform: MultiCropTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = key
        img = _image_of(self.source[index], "dataset")
        return self.transform(img, torch.Generator().manual_seed(seed))


class MultiCropIterableDataset(IterableDataset):
    """Iterable source (e.g. ``LakeDataset``) -> multi-crop views.

    The source must shard itself over ranks and data workers, as ``LakeDataset`` does. Each item
    is seeded by its ``image_id`` when it has one (else by worker and stream position).
    """

    def __init__(self, source: Iterable[Any], transform: MultiCropTransform, seed: int) -> None:
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for i, item in enumerate(self.source):
            key = item.get("image_id") if isinstance(item, dict) else None
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, key or f"{worker}:{i}"))
            yield self.transform(_image_of(item, "dataset"), g)


def collate_crops(items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack crop-major: ``global`` (2B, 1, G, G) = every image's view 0, then view 1; same for
    ``local`` and ``global_coords``."""
    out = {}
    for key in items[0]:
        stacked = torch.stack([it[key] for it in items], dim=1)  # (n_views, B, 1, S, S)
        out[key] = stacked.flatten(0, 1) if stacked.numel() else torch.empty(0)
    return out
