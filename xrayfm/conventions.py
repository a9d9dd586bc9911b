"""Conventions shared by every part of xrayfm, written once.

Image
    A decoded X-ray image is a 2-D ``numpy.float32`` array of shape ``(H, W)`` with values in
    ``[0, 1]`` and **dense tissue bright** (bone and metal high, air low), i.e. the display
    convention of MONOCHROME2. MONOCHROME1 inputs are inverted on decode. In the lake the same
    image is stored as ``uint16`` = ``round(x * 65535)``; tensors fed to networks have shape
    ``(B, 1, H, W)`` (one channel, no fake RGB) and are normalised by :data:`PIXEL_MEAN` /
    :data:`PIXEL_STD` inside the model input pipeline.

Points and boxes
    Points are ``(x, y)`` in pixels of the image they belong to: ``x`` is the column, ``y`` the
    row, the origin is the top-left corner of the top-left pixel, so the centre of pixel
    ``(row i, col j)`` is ``(j + 0.5, i + 0.5)``. Boxes are ``(x0, y0, x1, y1)`` in the same
    frame. Angles are in degrees, measured from the +x axis towards +y (image "down"), in
    ``(-180, 180]``.

Physical units
    Lengths in millimetres; pixel spacing as ``(row_spacing, col_spacing)`` in mm, as DICOM
    PixelSpacing orders it.
"""

from __future__ import annotations

import hashlib

import numpy as np

UINT16_MAX = 65535
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def check_image(img: np.ndarray, name: str = "image") -> np.ndarray:
    """Assert that ``img`` follows the decoded-image convention; return it unchanged."""
    if img.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) image, got shape {img.shape}")
    if img.dtype != np.float32:
        raise ValueError(f"{name}: expected float32, got {img.dtype}")
    if img.size and (float(img.min()) < 0.0 or float(img.max()) > 1.0):
        raise ValueError(f"{name}: values must lie in [0, 1], got [{img.min()}, {img.max()}]")
    return img


def to_uint16(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint16 storage form."""
    return np.round(np.clip(img, 0.0, 1.0) * UINT16_MAX).astype(np.uint16)


def from_uint16(arr: np.ndarray) -> np.ndarray:
    """uint16 storage form -> float32 image in [0, 1]."""
    return arr.astype(np.float32) * np.float32(1.0 / UINT16_MAX)


def direction_deg(start: np.ndarray, end: np.ndarray) -> float:
    """Angle of the direction ``start -> end`` (points ``(x, y)``) in degrees from +x towards +y."""
    d = np.asarray(end, np.float64) - np.asarray(start, np.float64)
    return float(np.degrees(np.arctan2(d[1], d[0])))


def pixel_hash(arr: np.ndarray) -> str:
    """Content hash of a decoded pixel array (shape, dtype and values), hex sha256.

    Used on the *source* frame as decoded from the file (before any intensity mapping or
    resize) for de-duplication and to join synthetic labels to anonymized lake rows.
    """
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    h = hashlib.sha256()
    h.update(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(memoryview(a).cast("B"))  # no copy of a multi-MB frame
    return h.hexdigest()
