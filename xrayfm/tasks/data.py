"""Labelled images for the heads: lake rows joined to synthetic labels, resizing, augmentation.

Heads work on square inputs of ``img_size`` px: an image is resized to ``(img_size, img_size)``
(aspect not kept: no pixels are lost to padding) and every label follows the same map (points
scaled per axis, metal and vertebra masks by nearest neighbour). Predictions are mapped back to
the original image before any metric is computed, so metrics are always in original lake-image
pixels. Augmentation: a random crop and flip (:func:`augment_item`) and the 8 exact
rotations/mirrors of :func:`dihedral_item`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from xrayfm.conventions import check_image, direction_deg, from_uint16


@dataclass
class LabeledImage:
    """One image with whatever labels it has (``None`` = no label for that task)."""

    image: np.ndarray                       # float32 (H, W) in [0, 1], xrayfm.conventions
    image_id: str
    split: str = "train"
    region_index: int | None = None
    mask: np.ndarray | None = None          # bool (H, W), True = metal
    screws: list[dict[str, Any]] | None = None  # visible screws: head, tip, box, end_on, head_visible, ...
    pixel_spacing_mm: float | None = None   # of this image
    bone_mask: np.ndarray | None = None     # bool (H, W), True = the ray runs through vertebrae
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return int(self.image.shape[0]), int(self.image.shape[1])


def scale_screw(s: dict[str, Any], sx: float, sy: float) -> dict[str, Any]:
    """Copy of a screw dict with head/tip/box scaled by ``sx`` (x) and ``sy`` (y)."""
    out = copy.deepcopy(s)
    for key in ("head", "tip"):
        out[key] = [float(s[key][0]) * sx, float(s[key][1]) * sy]
    if "box" in s and s["box"] is not None:
        x0, y0, x1, y1 = s["box"]
        out["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
    if "length_px" in s:
        d = np.subtract(out["tip"], out["head"])
        out["length_px"] = float(np.hypot(d[0], d[1]))
    return out


def endpoint_visible(s: dict[str, Any], end: str, height: int, width: int) -> bool:
    """Whether a screw's ``end`` (``"head"`` or ``"tip"``) can be pointed at: inside the image and
    not flagged hidden (``head_visible`` / ``tip_visible``: behind a collimator blade or outside
    the image-intensifier circle; absent = visible)."""
    x, y = s[end]
    return bool(s.get(f"{end}_visible", True)) and 0 <= x < width and 0 <= y < height


def screw_detectable(s: dict[str, Any], height: int, width: int) -> bool:
    """Both ends visible (:func:`endpoint_visible`): a screw a detector is scored on. Screws with
    a hidden end are truncated objects, neither missed nor false when found (KITTI's DontCare)."""
    return endpoint_visible(s, "head", height, width) and endpoint_visible(s, "tip", height, width)


def resize_item(item: LabeledImage, height: int, width: int | None = None) -> LabeledImage:
    """The item resized to ``(height, width)`` (square when ``width`` is None), labels following."""
    width = width or height
    h, w = item.size
    if (h, w) == (height, width):
        return item
    sx, sy = width / w, height / h
    interp = cv2.INTER_AREA if sx < 1 and sy < 1 else cv2.INTER_LINEAR
    img = np.clip(cv2.resize(item.image, (width, height), interpolation=interp), 0.0, 1.0).astype(np.float32)
    screws = None if item.screws is None else [scale_screw(s, sx, sy) for s in item.screws]
    spacing = None if item.pixel_spacing_mm is None else item.pixel_spacing_mm * (w / width)
    return replace(item, image=img, mask=resize_mask(item.mask, height, width), screws=screws,
                   pixel_spacing_mm=spacing, bone_mask=resize_mask(item.bone_mask, height, width))


def resize_mask(mask: np.ndarray | None, height: int, width: int) -> np.ndarray | None:
    """A bool mask resized to ``(height, width)`` by nearest neighbour (None stays None)."""
    if mask is None or mask.shape == (height, width):
        return mask
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


def augment_item(item: LabeledImage, rng: np.random.Generator, min_scale: float = 0.7,
                 flip: bool = True) -> LabeledImage:
    """Random crop covering ``min_scale``..1 of each side, then an optional horizontal flip.

    The crop keeps the item's size (it is resized back), so labels move with the pixels; an end
    that leaves the crop is no longer visible (:func:`endpoint_visible`) and screws with neither
    end nor centre left in the crop are dropped.
    """
    h, w = item.size
    s = rng.uniform(min_scale, 1.0)
    ch, cw = max(2, round(h * s)), max(2, round(w * s))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = item.image[y0:y0 + ch, x0:x0 + cw]
    mask = None if item.mask is None else item.mask[y0:y0 + ch, x0:x0 + cw]
    bone = None if item.bone_mask is None else item.bone_mask[y0:y0 + ch, x0:x0 + cw]
    screws = None
    if item.screws is not None:
        screws = []
        for sc in item.screws:
            moved = copy.deepcopy(sc)
            moved["head"] = [sc["head"][0] - x0, sc["head"][1] - y0]
            moved["tip"] = [sc["tip"][0] - x0, sc["tip"][1] - y0]
            if sc.get("box") is not None:
                bx0, by0, bx1, by1 = sc["box"]
                moved["box"] = [bx0 - x0, by0 - y0, bx1 - x0, by1 - y0]
            cx, cy = (moved["head"][0] + moved["tip"][0]) / 2, (moved["head"][1] + moved["tip"][1]) / 2
            if (0 <= cx < cw and 0 <= cy < ch) or any(endpoint_visible(moved, e, ch, cw) for e in ("head", "tip")):
                screws.append(moved)
    cropped = replace(item, image=np.ascontiguousarray(img), mask=mask, screws=screws, bone_mask=bone)
    out = resize_item(cropped, h, w)
    if flip and rng.random() < 0.5:
        out = hflip_item(out)
    return out


def hflip_item(item: LabeledImage) -> LabeledImage:
    """Mirror left-right (``x -> W - x``; a screw's head stays its head): :func:`dihedral_item` 4."""
    return dihedral_item(item, 4)


DIHEDRAL_ELEMENTS = 8


def dihedral_item(item: LabeledImage, k: int) -> LabeledImage:
    """The item under element ``k`` (0..7) of the dihedral group D4, labels following exactly.

    ``k >= 4`` first mirrors left-right (``x -> W - x``), then ``k % 4`` counter-clockwise
    quarter turns as displayed (``np.rot90``; one turn maps ``(x, y) -> (y, W - x)`` and swaps
    height and width). ``k = 0`` returns the item itself, ``k = 4`` is :func:`hflip_item`;
    rotations invert as ``k -> (4 - k) % 4``, mirrored elements are their own inverse. Image,
    metal and bone masks move as pixel arrays, screw heads and tips as points, boxes stay
    ``(x0, y0, x1, y1)`` with ``x0 <= x1``, ``y0 <= y1``; ``length_px`` is unchanged and a
    screw's ``angle_deg`` (when present) follows its head and tip.
    """
    if not 0 <= k < DIHEDRAL_ELEMENTS:
        raise ValueError(f"dihedral element must be in 0..{DIHEDRAL_ELEMENTS - 1}, got {k}")
    if k == 0:
        return item
    screws = None if item.screws is None else [_dihedral_screw(s, k, *item.size) for s in item.screws]
    return replace(item, image=_dihedral_array(item.image, k), mask=_dihedral_array(item.mask, k),
                   screws=screws, bone_mask=_dihedral_array(item.bone_mask, k))


def dihedral_inverse(k: int) -> int:
    """The D4 element undoing ``k`` (:func:`dihedral_item` numbering)."""
    return k if k >= 4 else (4 - k) % 4


def dihedral_linear(k: int) -> np.ndarray:
    """The 2 x 2 matrix by which element ``k`` moves an ``(x, y)`` vector (points as in
    :func:`dihedral_item`, without the translation)."""
    moved = _dihedral_points(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), k, 1, 1)
    return (moved[1:] - moved[0]).T


def _dihedral_array(a: np.ndarray | None, k: int) -> np.ndarray | None:
    """An ``(H, W)`` array under D4 element ``k`` (None stays None)."""
    if a is None:
        return None
    return np.ascontiguousarray(np.rot90(a[:, ::-1] if k >= 4 else a, k % 4))


def _dihedral_points(points: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """``(N, 2)`` points ``(x, y)`` of a ``(height, width)`` image under D4 element ``k``."""
    x, y = points[:, 0], points[:, 1]
    if k >= 4:
        x = width - x
    for _ in range(k % 4):  # one counter-clockwise quarter turn; the image's sides swap
        x, y, height, width = y, width - x, width, height
    return np.stack([x, y], 1)


def _dihedral_screw(s: dict[str, Any], k: int, height: int, width: int) -> dict[str, Any]:
    """Copy of a screw dict with head, tip, box (and angle) under D4 element ``k``."""
    out = copy.deepcopy(s)
    box = s.get("box")
    corners = [] if box is None else [box[:2], box[2:]]
    moved = _dihedral_points(np.array([s["head"], s["tip"], *corners], np.float64), k, height, width)
    out["head"], out["tip"] = moved[0].tolist(), moved[1].tolist()
    if box is not None:  # corners go to corners: the new box is their min / max
        out["box"] = [*moved[2:].min(0).tolist(), *moved[2:].max(0).tolist()]
    if "angle_deg" in s:
        out["angle_deg"] = direction_deg(moved[0], moved[1])
    return out


def images_tensor(items: list[LabeledImage]) -> torch.Tensor:
    """Stack equally sized items into a ``(B, 1, H, W)`` float32 tensor."""
    sizes = {it.size for it in items}
    if len(sizes) != 1:
        raise ValueError(f"items have different sizes {sorted(sizes)}; resize them first (resize_item)")
    return torch.from_numpy(np.stack([it.image for it in items]))[:, None].float()


def label_subset(items: list[LabeledImage], fraction: float, seed: int = 0,
                 key: str | None = "region_index") -> list[LabeledImage]:
    """Deterministic subset of ``fraction`` of the items (at least one per class when stratified
    by ``key``); a fraction > 1 is read as a number of items per class (few-shot)."""
    if fraction <= 0:
        raise ValueError(f"label fraction must be > 0, got {fraction}")
    if fraction == 1.0:
        return list(items)
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(getattr(it, key) if key else None, []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for g in sorted(groups, key=str):
        idx = sorted(groups[g], key=lambda i: items[i].image_id)
        n = int(fraction) if fraction > 1 else max(1, round(len(idx) * fraction))
        keep += [idx[j] for j in rng.permutation(len(idx))[: min(n, len(idx))]]
    return [items[i] for i in sorted(keep)]


def lake_items(lake: str, where: str | None = None) -> list[LabeledImage]:
    """The lake's images matching ``where`` (an SQL predicate over its columns), without labels:
    pretraining data or images to embed."""
    from xrayfm.lake import decode_image, read_rows

    rows = read_rows(lake, where=where, columns=["image_id", "split", "image"]).to_pylist()
    return [LabeledImage(image=from_uint16(decode_image(r["image"])), image_id=r["image_id"], split=r["split"])
            for r in rows]


def load_labeled_images(lake: str, labels: str, split: str | None = None,
                        visible_only: bool = True) -> tuple[list[LabeledImage], int]:
    """Lake images joined to synth labels (``labels.parquet`` or its synth run folder) on
    ``source_pixel_hash == pixel_hash``.

    Returns the joined items and the number of lake rows that had no label. Label coordinates
    and masks are scaled to the lake image when the lake resized it.
    """
    from xrayfm.lake import decode_image, read_rows
    from xrayfm.synth.labels import read_labels

    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r} is not one of train, val, test")
    if Path(labels).is_dir():  # a synth run folder
        labels = str(Path(labels) / "labels.parquet")
    by_hash = {lab.pixel_hash: lab for lab in read_labels(labels)}
    where = None if split is None else f"split = '{split}'"
    cols = ["image_id", "split", "source_pixel_hash", "image", "pixel_spacing_mm"]
    table = read_rows(lake, where=where, columns=cols).to_pylist()
    items: list[LabeledImage] = []
    for row in table:
        lab = by_hash.get(row["source_pixel_hash"])
        if lab is None:
            continue
        img = check_image(from_uint16(decode_image(row["image"])), f"lake image {row['image_id']}")
        h, w = img.shape
        sx, sy = w / lab.width, h / lab.height
        screws = [scale_screw(s, sx, sy) for s in lab.screws if s.get("visible", True) or not visible_only]
        spacing = row.get("pixel_spacing_mm")
        if spacing is None and lab.pixel_spacing_mm:
            spacing = float(lab.pixel_spacing_mm) / sx
        view = json.loads(lab.view) if isinstance(lab.view, str) else lab.view
        items.append(LabeledImage(image=img, image_id=row["image_id"], split=row["split"],
                                  region_index=int(lab.region_index), mask=resize_mask(lab.mask, h, w),
                                  screws=screws, pixel_spacing_mm=spacing,
                                  bone_mask=resize_mask(lab.vertebra_mask, h, w),
                                  extra={"region": lab.region, "view": view}))
    return items, len(table) - len(items)
