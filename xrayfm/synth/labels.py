"""Per-image labels of a synth run: ``labels.parquet``, one row per image (format in docs/synth.md).

Columns: pixel_hash, region, region_index, height, width, pixel_spacing_mm, mask_png (8-bit PNG,
255 = the pixel's ray meets metal), screws (JSON list of {head, tip, box, visible, head_visible,
tip_visible, end_on, angle_deg, length_px, material}), view (JSON), source, vertebrae_png (PNG like mask_png, 255 =
the ray runs >= 2 mm through vertebrae; null without vertebra labels, and files written before it
existed lack the column). Points/boxes follow xrayfm.conventions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrayfm.config import atomic_write_bytes
from xrayfm.synth.regions import REGIONS

COLUMNS = ("pixel_hash", "region", "region_index", "height", "width", "pixel_spacing_mm", "mask_png",
           "screws", "view", "source")


@dataclass
class SynthLabel:
    """Labels of one synthetic image (decoded form of one labels.parquet row)."""

    pixel_hash: str
    region: str
    height: int
    width: int
    pixel_spacing_mm: float
    mask: np.ndarray                      # bool (H, W)
    screws: list[dict[str, Any]] = field(default_factory=list)
    view: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    vertebra_mask: np.ndarray | None = None  # bool (H, W); None = the CT has no vertebra labels

    @property
    def region_index(self) -> int:
        return REGIONS.index(self.region)


def encode_mask(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data))) > 127


def label_rows(labels: list[SynthLabel]) -> dict[str, list]:
    """Column-wise plain values for a parquet table."""
    return {
        "pixel_hash": [lb.pixel_hash for lb in labels],
        "region": [lb.region for lb in labels],
        "region_index": [lb.region_index for lb in labels],
        "height": [int(lb.height) for lb in labels],
        "width": [int(lb.width) for lb in labels],
        "pixel_spacing_mm": [float(lb.pixel_spacing_mm) for lb in labels],
        "mask_png": [encode_mask(lb.mask) for lb in labels],
        "screws": [json.dumps(lb.screws) for lb in labels],
        "view": [json.dumps(lb.view) for lb in labels],
        "source": [lb.source for lb in labels],
        "vertebrae_png": [None if lb.vertebra_mask is None else encode_mask(lb.vertebra_mask)
                          for lb in labels],
    }


def write_labels(path: str | Path, labels: list[SynthLabel]) -> None:
    """Write ``labels`` to a parquet file atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("pixel_hash", pa.string()), ("region", pa.string()), ("region_index", pa.int32()),
                        ("height", pa.int32()), ("width", pa.int32()), ("pixel_spacing_mm", pa.float64()),
                        ("mask_png", pa.binary()), ("screws", pa.string()), ("view", pa.string()),
                        ("source", pa.string()), ("vertebrae_png", pa.binary())])
    table = pa.table(label_rows(labels), schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def read_labels(path: str | Path) -> list[SynthLabel]:
    """Read a labels.parquet written by :func:`write_labels` (or a synth run)."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no labels file; pass OUT/labels.parquet of a finished synth run")
    table = pq.read_table(p)
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise ValueError(f"{p}: not a synth labels file, missing columns {sorted(missing)}")
    out = []
    for row in table.to_pylist():
        out.append(SynthLabel(pixel_hash=row["pixel_hash"], region=row["region"], height=row["height"],
                              width=row["width"], pixel_spacing_mm=row["pixel_spacing_mm"],
                              mask=decode_mask(row["mask_png"]), screws=json.loads(row["screws"]),
                              view=json.loads(row["view"]), source=row["source"],
                              vertebra_mask=None if row.get("vertebrae_png") is None
                              else decode_mask(row["vertebrae_png"])))
    return out
