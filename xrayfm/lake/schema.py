"""Columns of the lake's Parquet shards and of its quarantine records.

One row per stored image frame. No DICOM header is ever stored, and no dates at all: only the
pseudonymous ids, the stored image and the whitelisted technical attributes below.
"""

from __future__ import annotations

import pyarrow as pa

INGEST_VERSION = "2"
LAKE_FORMAT = 1
IMAGES_DIR = "images"
QUARANTINE_DIR = "_quarantine"
RUNS_DIR = "_runs"
LAKE_META = "lake.json"
SPLITS = ("train", "val", "test")

# (column, DICOM keyword, arrow type). Multi-valued DICOM attributes are stored as their mean
# (positioner angles are single-valued; spacing is handled separately).
KEPT_DICOM: tuple[tuple[str, str, pa.DataType], ...] = (
    ("modality", "Modality", pa.string()),
    ("body_part", "BodyPartExamined", pa.string()),
    ("view_position", "ViewPosition", pa.string()),
    ("laterality", "ImageLaterality", pa.string()),
    ("photometric", "PhotometricInterpretation", pa.string()),
    ("bits_stored", "BitsStored", pa.int32()),
    ("kvp", "KVP", pa.float64()),
    ("exposure_mas", "Exposure", pa.float64()),
    ("tube_current_ma", "XRayTubeCurrent", pa.float64()),
    ("exposure_time_ms", "ExposureTime", pa.float64()),
    ("distance_source_to_detector_mm", "DistanceSourceToDetector", pa.float64()),
    ("distance_source_to_patient_mm", "DistanceSourceToPatient", pa.float64()),
    ("positioner_primary_angle_deg", "PositionerPrimaryAngle", pa.float64()),
    ("positioner_secondary_angle_deg", "PositionerSecondaryAngle", pa.float64()),
)
# Only with --retain-device-identity.
DEVICE_DICOM: tuple[tuple[str, str, pa.DataType], ...] = (
    ("manufacturer", "Manufacturer", pa.string()),
    ("model", "ManufacturerModelName", pa.string()),
    ("device_serial", "DeviceSerialNumber", pa.string()),
)

_CORE: tuple[tuple[str, pa.DataType], ...] = (
    ("image_id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("series_id", pa.string()),
    ("instance_id", pa.string()),
    ("frame_index", pa.int32()),
    ("num_frames", pa.int32()),
    ("split", pa.string()),
    ("source", pa.string()),
    ("source_kind", pa.string()),  # "dicom" or "image"
    ("source_pixel_hash", pa.string()),
    ("image", pa.binary()),
    ("image_codec", pa.string()),
    ("image_sha", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("pixel_spacing_mm", pa.float64()),  # of the stored image (mean of row/col), null if unknown
    ("orig_pixel_spacing_mm", pa.float64()),
)
_TAIL: tuple[tuple[str, pa.DataType], ...] = (
    ("ingest_version", pa.string()),
    ("ingested_at", pa.timestamp("s", tz="UTC")),
)

IMAGE_SCHEMA = pa.schema(
    [pa.field(n, t) for n, t in _CORE]
    + [pa.field(n, t) for n, _, t in KEPT_DICOM + DEVICE_DICOM]
    + [pa.field(n, t) for n, t in _TAIL]
)
BLOB_COLUMN = "image"
META_COLUMNS = [f.name for f in IMAGE_SCHEMA if f.name != BLOB_COLUMN]

# path_key = keyed hash of the path relative to the source root (paths can carry PHI, so the
# path itself is never stored in the lake); ext = the file's lowercased extension.
QUARANTINE_SCHEMA = pa.schema([
    pa.field("path_key", pa.string()),
    pa.field("ext", pa.string()),
    pa.field("source", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("message", pa.string()),
    pa.field("ingest_version", pa.string()),
    pa.field("ingested_at", pa.timestamp("s", tz="UTC")),
])
