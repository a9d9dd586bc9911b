"""DICOM frames -> :class:`DecodedFrame` through pydicom 3 and its pylibjpeg plugins.

Pipeline per frame (see docs/io.md): decode -> Modality LUT (rescale slope/intercept or Modality
LUT Sequence) -> optional VOI (window or VOI LUT Sequence, only with ``apply_voi=True``) -> scale
by the stored-bit range mapped through the modality transform -> invert MONOCHROME1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from xrayfm.conventions import pixel_hash
from xrayfm.io.dicom_meta import as_float, as_int, as_str, dicom_meta, frame_meta, frame_value
from xrayfm.io.frames import DecodedFrame, DecodeError, FrameSampling
from xrayfm.io.intensity import (
    affine_to_unit,
    area_resize,
    gray_from_color,
    resized_shape,
    stored_range,
    window_to_unit,
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GRAY = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a DICOM file (Part 10 with preamble, or a bare dataset pydicom reads)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return _looks_like_bare_dataset(head) and _read_bare(Path(path), stop_before_pixels=True) is not None


def _looks_like_bare_dataset(head: bytes) -> bool:
    # A dataset without preamble starts with a group 0002 or 0008 tag (little or big endian).
    if len(head) < 8:
        return False
    return int.from_bytes(head[:2], "little") in (0x0002, 0x0008) or int.from_bytes(head[:2], "big") == 0x0008


def _read_bare(path: Path, stop_before_pixels: bool) -> Dataset | None:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception:  # noqa: BLE001 - pydicom raises many types on garbage: all mean "not DICOM"
        return None
    return ds if len(ds) > 0 else None


def _load(src: str | os.PathLike[str] | Dataset) -> tuple[Dataset, str]:
    if isinstance(src, Dataset):
        return src, str(getattr(src, "filename", None) or "<in-memory dataset>")
    path = Path(src)
    name = str(path)
    if not path.is_file():
        raise DecodeError("not_found", f"{name}: no such file; check the path")
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise DecodeError("unreadable_file", f"{name}: cannot be opened ({exc.strerror}); check permissions") from exc
    if head[128:132] != b"DICM":
        ds = _read_bare(path, stop_before_pixels=False) if _looks_like_bare_dataset(head) else None
        if ds is None:
            raise DecodeError("not_dicom", f"{name}: not a DICOM file; pass a DICOM Part 10 file")
        return ds, name
    try:
        return pydicom.dcmread(path), name
    except Exception as exc:  # pydicom raises many types on damaged headers; all are the file's fault
        raise DecodeError(
            "corrupt_header",
            f"{name}: DICOM header cannot be parsed ({_brief(exc)}); the file is damaged, "
            "re-export it from the source system",
        ) from exc


def _brief(exc: BaseException, limit: int = 240) -> str:
    """Exception type and message on one line, cut to ``limit`` characters (codec errors ramble)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid:
        return UID(str(tsuid))
    encoding = getattr(ds, "original_encoding", (None, None))
    return {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
            (False, False): ExplicitVRBigEndian}.get(tuple(encoding))


def _check(ds: Dataset, name: str, tsuid: UID | None) -> Any:
    """Validate that ``ds`` holds a decodable greyscale(-like) image; return its pydicom decoder."""
    if len(ds) == 0:
        raise DecodeError("corrupt_header", f"{name}: DICOM file holds no data elements (truncated?); "
                          "re-export it from the source system")
    if "PixelData" not in ds:
        if any(k in ds for k in _PIXEL_KEYWORDS[1:]):
            raise DecodeError("unsupported_pixel_data",
                              f"{name}: float pixel data is not an X-ray image; pass integer X-ray images")
        if "Rows" in ds and "Columns" in ds:
            # pydicom stops silently at end of file inside encapsulated pixel data
            raise DecodeError("corrupt_pixel_data", f"{name}: image attributes present but PixelData missing "
                              "or cut off (truncated file?); re-export it from the source system")
        raise DecodeError("no_pixel_data", f"{name}: DICOM object has no PixelData (not an image); skip it")
    photometric = as_str(frame_value(ds, "PhotometricInterpretation"))
    if photometric is None:
        raise DecodeError("corrupt_header", f"{name}: PhotometricInterpretation is missing; "
                          "re-export the image with a complete Image Pixel module")
    if photometric not in _GRAY + _COLOR:
        raise DecodeError(
            "unsupported_photometric",
            f"{name}: photometric interpretation {photometric!r} is not supported; "
            "only MONOCHROME1/2 (or grey stored as RGB/YBR) X-ray images can be used",
        )
    if tsuid is None:
        raise DecodeError("unsupported_transfer_syntax",
                          f"{name}: transfer syntax unknown (no file meta); re-export it as DICOM Part 10")
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as exc:
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"{name}: transfer syntax {tsuid.name} ({tsuid}) has no pixel decoder; "
            "re-export the file uncompressed or in a JPEG/JPEG 2000/RLE syntax",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DecodeError(
            "unsupported_transfer_syntax",
            f"{name}: no decoder installed for {tsuid.name} ({tsuid}); install {missing}",
        )
    return decoder


def _num_frames(ds: Dataset) -> int:
    n = as_int(ds.get("NumberOfFrames"))
    return n if n is not None and n > 0 else 1


def read_dicom_frames(src: str | Path | Dataset, sampling: FrameSampling = FrameSampling(),  # noqa: B008
                      apply_voi: bool = False, max_side: int | None = None) -> Iterator[DecodedFrame]:
    """Decode the selected frames of a DICOM file or dataset, one :class:`DecodedFrame` each.

    Header problems (not DICOM, no pixel data, unsupported photometric or transfer syntax) raise
    :class:`DecodeError` at call time; pixel-data problems raise it while iterating. Each
    selected frame is decoded exactly once. The VOI window / LUT is recorded in ``meta`` always
    and applied only when ``apply_voi`` is true. With ``max_side`` each image is area-resized
    (INTER_AREA, never upsampled) so its longer side is at most ``max_side``; without a VOI the
    resize runs before the (affine) intensity map, which equals map-then-resize to float32
    rounding (see :func:`xrayfm.io.intensity.affine_to_unit`).
    """
    ds, name = _load(src)
    tsuid = _transfer_syntax(ds)
    decoder = _check(ds, name, tsuid)
    num_frames = _num_frames(ds)
    base = dicom_meta(ds, str(tsuid), num_frames)
    return _frames(ds, name, decoder, sampling.select(num_frames), base, apply_voi, max_side)


def _frames(ds: Dataset, name: str, decoder: Any, indices: list[int], base: dict[str, Any],
            apply_voi: bool, max_side: int | None) -> Iterator[DecodedFrame]:
    if not indices:
        return
    arrays = decoder.iter_array(ds, indices=indices)
    for index in indices:
        try:
            arr, _ = next(arrays)
        except StopIteration as exc:
            raise DecodeError("corrupt_pixel_data", f"{name}: pixel data holds fewer frames than "
                              f"NumberOfFrames says (no frame {index}); the file is truncated") from exc
        except Exception as exc:  # codecs raise ValueError/RuntimeError/struct.error/... on bad data
            raise DecodeError(
                "corrupt_pixel_data",
                f"{name}: pixel data of frame {index} cannot be decoded ({_brief(exc)}); "
                "the file is truncated or damaged, re-export it from the source system",
            ) from exc
        meta = {**base, **frame_meta(ds, index)}
        shape = (arr.shape[0], arr.shape[1])
        image, voi_applied = _to_unit(arr, ds, index, name, apply_voi, resized_shape(*shape, max_side))
        meta["voi_applied"] = voi_applied
        yield DecodedFrame(image=image, raw_hash=pixel_hash(arr), frame_index=index,
                           num_frames=base["num_frames"], meta=meta, source_shape=shape)


def _to_unit(arr: np.ndarray, ds: Dataset, index: int, name: str, apply_voi: bool,
             size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Decoded frame -> float32 [0, 1] dense-bright image of ``size`` (h, w); also whether a VOI
    was applied."""
    bits = min(as_int(ds.get("BitsStored")) or 64, arr.dtype.itemsize * 8)
    lo, hi = stored_range(bits, arr.dtype.kind == "i")
    invert = as_str(frame_value(ds, "PhotometricInterpretation")) == "MONOCHROME1"
    color = arr.ndim == 3
    values = gray_from_color(arr, hi, name) if color else arr
    if not color and "ModalityLUTSequence" in ds:
        values, (lo, hi) = _modality_lut(values, ds, name)
        slope, intercept = 1.0, 0.0
    else:
        slope = as_float(frame_value(ds, "RescaleSlope", index)) or 1.0
        intercept = as_float(frame_value(ds, "RescaleIntercept", index)) or 0.0
    if not (apply_voi and _has_voi(ds, index)):
        return affine_to_unit(values, lo, hi, slope, intercept, invert, size), False
    modality = values.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        modality *= np.float32(slope)
        modality += np.float32(intercept)
    image = _voi(modality, ds, index, name)
    if invert:
        np.subtract(1.0, image, out=image)
    return area_resize(image, size), True


def _modality_lut(values: np.ndarray, ds: Dataset, name: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply a Modality LUT Sequence; return float32 values and the LUT's output range."""
    try:
        item = ds.ModalityLUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        lut_values = apply_modality_lut(values, ds)
    except Exception as exc:  # malformed LUTs raise assorted errors inside pydicom
        raise DecodeError("corrupt_header", f"{name}: Modality LUT Sequence is malformed ({_brief(exc)}); "
                          "re-export the image with a valid Modality LUT") from exc
    return lut_values.astype(np.float32, copy=False), (0.0, float(2**out_bits - 1))


def _has_voi(ds: Dataset, index: int) -> bool:
    if "VOILUTSequence" in ds:
        return True
    width = as_float(frame_value(ds, "WindowWidth", index))
    return as_float(frame_value(ds, "WindowCenter", index)) is not None and width is not None and width > 0


def _voi(values: np.ndarray, ds: Dataset, index: int, name: str) -> np.ndarray:
    """VOI LUT Sequence (preferred, as pydicom does) or window of modality values -> [0, 1]."""
    if "VOILUTSequence" in ds:
        try:
            out_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lut_out = apply_voi(np.rint(values).astype(np.int64), ds, 0)  # LUT inputs are integers
        except Exception as exc:  # malformed LUTs raise assorted errors inside pydicom
            raise DecodeError("corrupt_header", f"{name}: VOI LUT Sequence is malformed ({_brief(exc)}); "
                              "decode without apply_voi or fix the VOI LUT") from exc
        return affine_to_unit(lut_out, 0.0, float(2**out_bits - 1))
    center = as_float(frame_value(ds, "WindowCenter", index))
    width = as_float(frame_value(ds, "WindowWidth", index))
    function = (as_str(frame_value(ds, "VOILUTFunction", index)) or "LINEAR").upper()
    return window_to_unit(values, center, width, function)  # type: ignore[arg-type]
