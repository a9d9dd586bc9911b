"""Test data for the heads: real radiograph crops (pydicom-data CR) with painted metal screws.

Each screw is a bright rod from ``head`` to ``tip`` with a wider disc at the head, so its
direction is visible; the mask is every painted pixel. Truth is therefore exact and known.
``build_tiny_bundle`` trains the three heads on such crops into a tiny model bundle.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from xrayfm.models.backbones import create_backbone
from xrayfm.models.bundle import ModelBundle
from xrayfm.models.card import export_backbone, load_backbone
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.train import HeadTrainConfig, head_arguments, save_head_bundle, train_head


@functools.lru_cache(maxsize=4)
def radiograph(name: str = "RG1_UNCR.dcm", side: int = 384) -> np.ndarray:
    """A real CR radiograph, MONOCHROME1 inverted, in [0, 1], longest side ``side`` px."""
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is needed for real radiographs")
    try:
        path = data.get_testdata_file(name)
    except Exception as exc:  # noqa: BLE001 - any lookup failure means the file is unavailable
        pytest.skip(f"pydicom-data file {name} unavailable: {exc}")
    if path is None:
        pytest.skip(f"pydicom-data file {name} unavailable (pip install pydicom-data)")
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32)
    a = (a - a.min()) / max(float(np.ptp(a)), 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = 1.0 - a
    import cv2

    f = side / max(a.shape)
    return cv2.resize(a, (round(a.shape[1] * f), round(a.shape[0] * f)), interpolation=cv2.INTER_AREA)


def paint_screw(img: np.ndarray, mask: np.ndarray, head: tuple[float, float], tip: tuple[float, float],
                width: float = 2.0, head_radius: float = 3.5) -> None:
    """Paint a rod (half-width ``width``) and a head disc in place; pixel centres at +0.5."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    p = np.stack([xx, yy], -1)
    a, b = np.asarray(head, float), np.asarray(tip, float)
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
    dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    on = (dist <= width) | (np.linalg.norm(p - a, axis=-1) <= head_radius)
    img[on] = 0.98
    mask |= on


def rod_item(seed: int, size: int = 64, n_max: int = 2, image: str = "RG1_UNCR.dcm",
             split: str = "train") -> LabeledImage:
    """A random ``size`` px crop of a real radiograph with 0..n_max painted screws."""
    rng = np.random.default_rng(seed)
    base = radiograph(image)
    y0 = int(rng.integers(0, base.shape[0] - size))
    x0 = int(rng.integers(0, base.shape[1] - size))
    img = base[y0:y0 + size, x0:x0 + size].copy()
    mask = np.zeros_like(img, dtype=bool)
    screws = []
    for _ in range(int(rng.integers(0, n_max + 1))):
        c = rng.uniform(0.3 * size, 0.7 * size, 2)
        ang = rng.uniform(-np.pi, np.pi)
        half = rng.uniform(0.12, 0.25) * size
        head = c - half * np.array([np.cos(ang), np.sin(ang)])
        tip = c + half * np.array([np.cos(ang), np.sin(ang)])
        paint_screw(img, mask, tuple(head), tuple(tip))
        screws.append({"head": head.tolist(), "tip": tip.tolist(), "end_on": False,
                       "box": [*np.minimum(head, tip).tolist(), *np.maximum(head, tip).tolist()]})
    return LabeledImage(image=img.astype(np.float32), image_id=f"rod{seed}", split=split,
                        region_index=0 if image.startswith("RG1") else 1, mask=mask, screws=screws,
                        pixel_spacing_mm=0.5)


BUNDLE_SIZE = 64


def build_tiny_bundle(
    root: Path, tasks: tuple[str, ...] = ("classify", "segment", "detect"), arch: str = "vit_tiny_patch16"
) -> Path:
    """Random-init ``arch`` exported with export_backbone + heads trained 2 epochs on painted rods
    (the segment head at stride 2 with ``image_skip``, so the bundle feeds it the input image)."""
    torch.manual_seed(0)
    bb_dir = root / "backbone"
    export_backbone(
        create_backbone(arch, img_size=BUNDLE_SIZE), bb_dir, BUNDLE_SIZE, extra={"method": "random_init"}
    )
    backbone, card = load_backbone(str(bb_dir))
    items = [rod_item(i, size=BUNDLE_SIZE, image="RG1_UNCR.dcm" if i % 2 else "RG3_UNCR.dcm") for i in range(8)]
    heads = []
    for task in tasks:
        fine = {"out_stride": 2, "image_skip": True} if task == "segment" else {}
        cfg = HeadTrainConfig(task=task, img_size=BUNDLE_SIZE, epochs=2, batch_size=8, head_width=16, **fine)
        head, history = train_head(backbone, items, cfg)
        heads.append(
            save_head_bundle(
                root / f"head_{task}", head, cfg, backbone, card, history, head_arguments(get_task(task), cfg)
            )
        )
    return ModelBundle.create(bb_dir, heads, root / "bundle")
