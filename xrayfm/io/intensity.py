"""Intensity mapping to the [0, 1], dense-tissue-bright convention (pure numpy, float32 only).

Scaling uses the *range the data could take* (the BitsStored range, or the dtype range for PNG
and friends), never the image's own min/max: a dark image must stay dark.
"""

from __future__ import annotations

import math

import numpy as np

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


def affine_to_unit(values: np.ndarray, lo: float, hi: float, slope: float = 1.0,
                   intercept: float = 0.0, invert: bool = False) -> np.ndarray:
    """Map stored values in ``[lo, hi]`` through ``v * slope + intercept`` onto [0, 1].

    The output range is the rescaled image of ``[lo, hi]``, so a negative slope flips the image;
    ``invert`` (MONOCHROME1) flips it again. One float32 pass plus two in-place operations.
    """
    r0, r1 = sorted((lo * slope + intercept, hi * slope + intercept))
    span = (r1 - r0) or 1.0
    a = slope / span
    b = (intercept - r0) / span
    if invert:
        a, b = -a, 1.0 - b
    out = values.astype(np.float32)
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

