"""PNG / JPEG / TIFF (8 or 16 bit) -> :class:`DecodedFrame`, and :func:`read_any` for any input.

Plain images carry no photometric tag: they are taken as displayed (dense tissue bright) and
scaled by their dtype range, never by their own min/max.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset

from xrayfm.conventions import pixel_hash
from xrayfm.io.dicom import is_dicom, read_dicom_frames
from xrayfm.io.dicom_meta import dicom_meta, frame_meta
from xrayfm.io.frames import DecodedFrame, DecodeError, FrameSampling
from xrayfm.io.intensity import affine_to_unit, gray_from_color

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def image_format(path: str | os.PathLike[str]) -> str | None:
    """"PNG", "JPEG" or "TIFF" from the file's first bytes (not its name), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def _empty_meta() -> dict[str, Any]:
    # The same keys as a DICOM record, so consumers can rely on one schema.
    return {**dicom_meta(Dataset(), None, 1), **frame_meta(Dataset(), 0), "voi_applied": False}


def read_image_file(path: str | Path) -> DecodedFrame:
    """Decode a PNG, JPEG or TIFF (first page) X-ray image; colour with equal channels -> grey."""
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise DecodeError("not_found", f"{name}: no such file; check the path")
    fmt = image_format(p)
    try:
        arr = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except (cv2.error, OSError, ValueError) as exc:
        raise DecodeError("unreadable_image", f"{name}: image cannot be decoded ({exc}); "
                          "pass a valid PNG, JPEG or TIFF file") from exc
    if arr is None or arr.size == 0:
        raise DecodeError("unreadable_image", f"{name}: not a readable PNG, JPEG or TIFF image "
                          "(unknown format, truncated or damaged); pass a valid image file")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype.kind == "f":
        lo, hi = 0.0, 1.0
        if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise DecodeError("unsupported_pixel_data", f"{name}: floating-point image with values outside "
                              "[0, 1]; save it as 8- or 16-bit integers")
    elif arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        lo, hi = float(info.min), float(info.max)
    else:
        raise DecodeError("unsupported_pixel_data", f"{name}: pixel type {arr.dtype} is not supported; "
                          "save it as 8- or 16-bit integers")
    values = gray_from_color(arr, hi - lo, name) if arr.ndim == 3 else arr
    image = affine_to_unit(values, lo, hi)
    bits = arr.dtype.itemsize * 8
    meta = {**_empty_meta(), "rows": int(image.shape[0]), "cols": int(image.shape[1]), "bits_stored": bits,
            "bits_allocated": bits, "pixel_representation": int(arr.dtype.kind == "i"),
            "photometric": "RGB" if arr.ndim == 3 else "MONOCHROME2", "format": fmt}
    return DecodedFrame(image=image, raw_hash=pixel_hash(arr), frame_index=0, num_frames=1, meta=meta,
                        source_shape=(image.shape[0], image.shape[1]))


def read_any(path: str | Path, sampling: FrameSampling = FrameSampling(),  # noqa: B008
             apply_voi: bool = False) -> Iterator[DecodedFrame]:
    """Decode any supported file, chosen by content: DICOM (all selected frames) or PNG/JPEG/TIFF."""
    if not Path(path).is_file():
        raise DecodeError("not_found", f"{path}: no such file; check the path")
    if is_dicom(path):
        return read_dicom_frames(path, sampling, apply_voi)
    if image_format(path) is not None:
        return iter([read_image_file(path)])
    raise DecodeError("unsupported_format", f"{path}: neither DICOM nor PNG/JPEG/TIFF; "
                      "pass a DICOM file or a PNG, JPEG or TIFF image")
