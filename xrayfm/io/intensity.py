"""Intensity mapping to the [0, 1], dense-tissue-bright convention (float32 only), and area resize.

Scaling uses the *range the data could take* (the BitsStored range, or the dtype range for PNG
and friends), never the image's own min/max: a dark image must stay dark.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
from scipy.sparse import csr_matrix

from xrayfm.io.frames import DecodeError

# Channels of a "grey stored as colour" image may differ by codec rounding (lossy JPEG chroma);
# more than this fraction of the value range means real colour.
GRAY_TOLERANCE = 0.01


def stored_range(bits_stored: int, signed: bool) -> tuple[float, float]:
    """(lowest, highest) value representable with ``bits_stored`` bits."""
    if signed:
        return -float(2 ** (bits_stored - 1)), float(2 ** (bits_stored - 1) - 1)
    return 0.0, float(2**bits_stored - 1)


def gray_from_color(arr: np.ndarray, value_max: float, name: str) -> np.ndarray:
    """(H, W, C) colour array whose first three channels are (near) equal -> float32 (H, W).

    Raises ``DecodeError("unsupported_photometric")`` for real colour.
    """
    rgb = arr[..., :3]
    if rgb.shape[-1] != 3:
        raise DecodeError(
            "unsupported_photometric",
            f"{name}: {rgb.shape[-1]}-channel pixel data is not an X-ray image; "
            "convert it to single-channel greyscale",
        )
    tol = max(1.0, math.ceil(GRAY_TOLERANCE * value_max))
    wide = rgb.astype(np.int64) if rgb.dtype.itemsize >= 4 else rgb.astype(np.int32)
    diff = max(int(np.abs(wide[..., 0] - wide[..., 1]).max(initial=0)),
               int(np.abs(wide[..., 0] - wide[..., 2]).max(initial=0)))
    if diff > tol:
        raise DecodeError(
            "unsupported_photometric",
            f"{name}: true-colour image (channels differ by up to {diff}); "
            "only greyscale X-rays are supported, convert it to greyscale first",
        )
    return rgb.mean(axis=-1, dtype=np.float32)


def resized_shape(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(H, W) after scaling the longer side down to ``max_side`` (None: unchanged); never upsampled."""
    if max_side is None:
        return height, width
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


@functools.lru_cache(maxsize=64)
def _area_weights(src: int, dst: int) -> csr_matrix:
    """(dst, src) weights of an area (box) shrink along one axis, as OpenCV's INTER_AREA table
    defines them: output cell d covers source [d*s, (d+1)*s), s = src/dst, and each source pixel
    weighs its overlap with the cell over the cell width (overlaps under 1e-3 px are dropped)."""
    scale = 1.0 / (dst / src)
    d = np.arange(dst)
    f1 = d * scale
    f2 = f1 + scale
    cell = np.minimum(scale, src - f1)
    s2 = np.minimum(np.floor(f2), src - 1).astype(np.int64)
    s1 = np.minimum(np.ceil(f1).astype(np.int64), s2)
    counts = s2 - s1  # whole source pixels s1 .. s2-1 of each cell
    starts = np.cumsum(counts) - counts
    left, right = s1 - f1 > 1e-3, f2 - s2 > 1e-3
    rows = np.concatenate([d[left], np.repeat(d, counts), d[right]])
    cols = np.concatenate([s1[left] - 1, np.arange(counts.sum()) - np.repeat(starts - s1, counts), s2[right]])
    vals = np.concatenate([((s1 - f1) / cell)[left], np.repeat(1.0 / cell, counts),
                           (np.minimum(np.minimum(f2 - s2, 1.0), cell) / cell)[right]])
    return csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(dst, src))


def area_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area (box filter, OpenCV INTER_AREA) shrink of a float32 (H, W) image to ``size`` = (h, w);
    the same array when it already has that size.

    Equal to ``cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)`` up to float32 rounding, at
    about a third of its CPU time for 4x shrinks: OpenCV's horizontal pass is a scalar loop over
    every source row, so the rows are first combined here by a sparse matrix product (vectorised
    along each row) and OpenCV then only shrinks the ``h`` remaining rows horizontally.
    """
    h, w = size
    if (h, w) == img.shape:
        return img
    if h > img.shape[0] or w > img.shape[1]:
        raise ValueError(f"area_resize only shrinks; cannot resize {img.shape} to {size}")
    rows = img if h == img.shape[0] else _area_weights(img.shape[0], h) @ img
    return rows if w == img.shape[1] else cv2.resize(rows, (w, h), interpolation=cv2.INTER_AREA)


def affine_to_unit(values: np.ndarray, lo: float, hi: float, slope: float = 1.0,
                   intercept: float = 0.0, invert: bool = False,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """Map stored values in ``[lo, hi]`` through ``v * slope + intercept`` onto [0, 1].

    The output range is the rescaled image of ``[lo, hi]``, so a negative slope flips the image;
    ``invert`` (MONOCHROME1) flips it again. With ``size`` (h, w) the result is also area-resized
    to that size: the map is affine and an area resize is a weighted mean, so resizing the raw
    values first and mapping the small image is the same result (to float32 rounding) as mapping
    then resizing, with the float work on 4-16x fewer pixels.
    """
    r0, r1 = sorted((lo * slope + intercept, hi * slope + intercept))
    span = (r1 - r0) or 1.0
    a = slope / span
    b = (intercept - r0) / span
    if invert:
        a, b = -a, 1.0 - b
    out = values.astype(np.float32)
    if size is not None and size != out.shape:
        # clipping to [lo, hi] here equals clipping the mapped image to [0, 1] (the map sends one
        # onto the other); decoded stored values are almost always in range, so check before paying
        if values.size and (values.min() < lo or values.max() > hi):
            np.clip(out, np.float32(lo), np.float32(hi), out=out)
        out = area_resize(out, size)
    out *= np.float32(a)
    out += np.float32(b)
    return np.clip(out, 0.0, 1.0, out=out)


def window_to_unit(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI window (PS3.3 C.11.2.1.2) of modality-space ``values`` onto [0, 1] (float32).

    ``function`` is the VOI LUT Function: ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    """
    v = values.astype(np.float32, copy=False)
    c, w = float(center), float(width)
    if function == "SIGMOID":
        out = np.float32(-4.0 / w) * (v - np.float32(c))
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    if function == "LINEAR_EXACT":
        out = (v - np.float32(c)) * np.float32(1.0 / w) + np.float32(0.5)
    elif w <= 1.0:
        out = (v > np.float32(c - 0.5)).astype(np.float32)
    else:
        out = (v - np.float32(c - 0.5)) * np.float32(1.0 / (w - 1.0)) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)

