"""Image encoding of the lake: self-describing, lossless blobs of ``uint16`` images.

A blob is a 12-byte header followed by the payload::

    magic b"XRL" | version u8 | codec u8 | dtype u8 (1 = uint16) | reserved u16 | height u16 | width u16

(little endian). Codecs, chosen by measurement (see docs/lake.md):

- ``zstd-vdelta`` (id 1, default): vertical delta (row minus the row above, modulo 2^16), the two
  byte planes stored one after the other, then zstd level 1. Decodes at ~1,000 images/s per core
  for 512-px radiographs, 1.4-2.6x smaller than raw.
- ``zstd`` (id 0): raw little-endian uint16 then zstd. Fastest decode, weakest compression.
"""

from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np
import zstandard

from xrayfm.conventions import check_image
from xrayfm.io.intensity import area_resize, resized_shape

_MAGIC = b"XRL"
_VERSION = 1
_HEADER = struct.Struct("<3sBBBHHH")
_DTYPE_UINT16 = 1
CODECS: dict[str, int] = {"zstd": 0, "zstd-vdelta": 1}
DEFAULT_CODEC = "zstd-vdelta"
_local = threading.local()


class CodecError(ValueError):
    """A blob that is not a valid lake image."""


def _zstd(level: int) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    # zstd contexts are not thread-safe; one pair per thread (DataLoader workers are processes).
    cache = getattr(_local, "ctx", None)
    if cache is None:
        cache = _local.ctx = {}
    if level not in cache:
        cache[level] = (zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor())
    return cache[level]


def encode_image(arr: np.ndarray, codec: str = DEFAULT_CODEC, level: int = 1) -> bytes:
    """Encode a 2-D ``uint16`` image into a self-describing lake blob."""
    if codec not in CODECS:
        raise ValueError(f"unknown lake codec {codec!r}; choose one of {sorted(CODECS)}")
    if arr.ndim != 2 or arr.dtype != np.uint16:
        raise ValueError(f"lake images must be 2-D uint16, got shape {arr.shape} dtype {arr.dtype}")
    h, w = arr.shape
    if not (0 < h < 65536 and 0 < w < 65536):
        raise ValueError(f"lake image size {h}x{w} out of range 1..65535")
    a = np.ascontiguousarray(arr, dtype="<u2")
    if codec == "zstd-vdelta":
        delta = np.empty_like(a)
        delta[0] = a[0]
        np.subtract(a[1:], a[:-1], out=delta[1:])
        planes = delta.view(np.uint8).reshape(h, w, 2)
        payload = np.ascontiguousarray(planes.transpose(2, 0, 1))
    else:
        payload = a
    comp, _ = _zstd(level)
    header = _HEADER.pack(_MAGIC, _VERSION, CODECS[codec], _DTYPE_UINT16, 0, h, w)
    return header + comp.compress(payload)


def decode_image(blob: bytes) -> np.ndarray:
    """Decode a lake blob into a ``uint16`` array of shape (H, W)."""
    if len(blob) < _HEADER.size:
        raise CodecError(f"lake image blob is {len(blob)} bytes, shorter than its header")
    magic, version, codec, dtype, _, h, w = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION or dtype != _DTYPE_UINT16:
        raise CodecError("lake image blob has a bad header (not written by xrayfm.lake, or damaged)")
    _, decomp = _zstd(1)
    try:
        raw = decomp.decompress(memoryview(blob)[_HEADER.size:], max_output_size=2 * h * w)
    except zstandard.ZstdError as exc:
        raise CodecError(f"lake image blob payload is damaged: {exc}") from exc
    if len(raw) != 2 * h * w:
        raise CodecError(f"lake image blob holds {len(raw)} bytes, expected {2 * h * w} for {h}x{w}")
    if codec == CODECS["zstd"]:
        return np.frombuffer(raw, dtype="<u2").reshape(h, w).astype(np.uint16)
    if codec == CODECS["zstd-vdelta"]:
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(2, h, w)
        out = planes[0].astype(np.uint16)
        out |= planes[1].astype(np.uint16) << 8
        np.cumsum(out, axis=0, dtype=np.uint16, out=out)
        return out
    raise CodecError(f"lake image blob uses unknown codec id {codec}")


def image_sha(arr: np.ndarray) -> str:
    """sha256 (hex) of a stored image's decoded pixels, shape and dtype included."""
    a = np.ascontiguousarray(arr, dtype="<u2")
    h = hashlib.sha256(f"{a.shape}|".encode())
    h.update(memoryview(a))  # no copy of the pixels
    return h.hexdigest()


def resize_max_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Area-resize a float image in [0, 1] so its longer side is at most ``max_side``."""
    if img.ndim != 2 or img.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 image, got shape {img.shape} dtype {img.dtype}")
    size = resized_shape(*img.shape, max_side)
    if size == img.shape:
        return img
    out = area_resize(img, size)
    return check_image(np.clip(out, 0.0, 1.0, out=out))
