"""Technical metadata of a DICOM frame: a JSON-serialisable dict, ``None`` where absent.

Only acquisition/geometry/encoding attributes are read; names, IDs, dates and instance UIDs
never enter the record (the SOP class and transfer syntax UIDs are not identifying).
Enhanced (multi-frame functional group) objects are handled: a per-frame value wins over the
shared one, which wins over the top-level attribute.
"""

from __future__ import annotations

import math
from typing import Any

from pydicom.dataset import Dataset

# Conversions of malformed header values raise these; a bad value becomes None, not a crash.
_BAD_VALUE = (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError)

# Functional-group sequence holding each frame-varying attribute in enhanced objects.
_GROUP_OF = {
    "PixelSpacing": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
    "PositionerPrimaryAngle": "PositionerPositionSequence",
    "PositionerSecondaryAngle": "PositionerPositionSequence",
}


def frame_value(ds: Dataset, keyword: str, index: int = 0) -> Any:
    """Value of ``keyword`` for frame ``index``: per-frame group, shared group, then top level."""
    group = _GROUP_OF.get(keyword)
    if group is not None:
        for container, i in (("PerFrameFunctionalGroupsSequence", index),
                             ("SharedFunctionalGroupsSequence", 0)):
            try:
                item = ds[container].value[i]
                value = item[group].value[0].get(keyword)
            except _BAD_VALUE:
                continue
            if value is not None and value != "":
                return value
    try:
        value = ds.get(keyword)
    except _BAD_VALUE:
        return None
    return None if value == "" else value


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def as_float(value: Any) -> float | None:
    """First value of a DS/IS/US/FD element as a finite float, else None."""
    try:
        v = _first(value)
        f = float(v) if v is not None and v != "" else None
    except _BAD_VALUE:
        return None
    return f if f is not None and math.isfinite(f) else None


def as_int(value: Any) -> int | None:
    f = as_float(value)
    return int(f) if f is not None else None


def as_str(value: Any) -> str | None:
    v = _first(value)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _pair(value: Any) -> list[float] | None:
    """A (row, col) spacing pair of positive finite floats, else None ([0, 0] means unknown)."""
    try:
        vals = [float(x) for x in value]
    except _BAD_VALUE:
        return None
    if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
        return None
    return vals


def pixel_spacing(ds: Dataset, index: int = 0) -> tuple[list[float] | None, str | None]:
    """(row, col) spacing in mm and where it came from.

    PixelSpacing (patient plane) first; else ImagerPixelSpacing (detector plane) divided by
    EstimatedRadiographicMagnificationFactor when present; else ImagerPixelSpacing as is.
    """
    ps = _pair(frame_value(ds, "PixelSpacing", index))
    if ps is not None:
        return ps, "pixel_spacing"
    imager = _pair(frame_value(ds, "ImagerPixelSpacing", index))
    if imager is None:
        return None, None
    mag = as_float(frame_value(ds, "EstimatedRadiographicMagnificationFactor", index))
    if mag is not None and mag > 0:
        return [v / mag for v in imager], "imager_corrected"
    return imager, "imager_pixel_spacing"


def _scaled(ds: Dataset, keyword: str, fallback: str, factor: float) -> float | None:
    v = as_float(frame_value(ds, keyword))
    if v is None:
        f = as_float(frame_value(ds, fallback))
        v = None if f is None else f * factor
    return v


def _burned_in(ds: Dataset) -> bool | None:
    v = as_str(frame_value(ds, "BurnedInAnnotation"))
    return None if v is None else v.upper() == "YES"


def dicom_meta(ds: Dataset, transfer_syntax_uid: str | None, num_frames: int) -> dict[str, Any]:
    """Frame-independent part of the metadata record (see :func:`frame_meta` for the rest)."""
    return {
        "modality": as_str(frame_value(ds, "Modality")),
        "sop_class_uid": as_str(frame_value(ds, "SOPClassUID")),
        "body_part": as_str(frame_value(ds, "BodyPartExamined")),
        "view_position": as_str(frame_value(ds, "ViewPosition")),
        "laterality": as_str(frame_value(ds, "ImageLaterality")) or as_str(frame_value(ds, "Laterality")),
        "photometric": as_str(frame_value(ds, "PhotometricInterpretation")),
        "bits_stored": as_int(frame_value(ds, "BitsStored")),
        "bits_allocated": as_int(frame_value(ds, "BitsAllocated")),
        "pixel_representation": as_int(frame_value(ds, "PixelRepresentation")),
        "rows": as_int(frame_value(ds, "Rows")),
        "cols": as_int(frame_value(ds, "Columns")),
        "num_frames": num_frames,
        "kvp": as_float(frame_value(ds, "KVP")),
        "exposure_mas": _scaled(ds, "Exposure", "ExposureInuAs", 1e-3),
        "tube_current_ma": _scaled(ds, "XRayTubeCurrent", "XRayTubeCurrentInuA", 1e-3),
        "exposure_time_ms": _scaled(ds, "ExposureTime", "ExposureTimeInuS", 1e-3),
        "distance_source_to_detector_mm": as_float(frame_value(ds, "DistanceSourceToDetector")),
        "distance_source_to_patient_mm": as_float(frame_value(ds, "DistanceSourceToPatient")),
        "transfer_syntax_uid": transfer_syntax_uid,
        "burned_in_annotation": _burned_in(ds),
        "manufacturer": as_str(frame_value(ds, "Manufacturer")),
        "manufacturer_model_name": as_str(frame_value(ds, "ManufacturerModelName")),
        "device_serial_number": as_str(frame_value(ds, "DeviceSerialNumber")),
    }


def frame_meta(ds: Dataset, index: int) -> dict[str, Any]:
    """Frame-dependent part: index, spacing, positioner angles, window and rescale values."""
    spacing, source = pixel_spacing(ds, index)
    return {
        "frame_index": index,
        "pixel_spacing_mm": spacing,
        "spacing_source": source,
        "positioner_primary_angle": as_float(frame_value(ds, "PositionerPrimaryAngle", index)),
        "positioner_secondary_angle": as_float(frame_value(ds, "PositionerSecondaryAngle", index)),
        "window_center": as_float(frame_value(ds, "WindowCenter", index)),
        "window_width": as_float(frame_value(ds, "WindowWidth", index)),
        "rescale_slope": as_float(frame_value(ds, "RescaleSlope", index)),
        "rescale_intercept": as_float(frame_value(ds, "RescaleIntercept", index)),
    }
