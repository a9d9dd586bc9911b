"""Region rules on hand-made cases and the labels.parquet round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xrayfm.synth.labels import SynthLabel, read_labels, write_labels
from xrayfm.synth.regions import REGIONS, classify_region, field_coverage, region_index


def test_taxonomy_is_the_agreed_eleven_classes() -> None:
    assert REGIONS == ("head", "cervical_spine", "shoulder", "thorax", "thoracic_spine", "lumbar_spine",
                       "abdomen", "pelvis", "hip", "upper_limb", "lower_limb")
    assert region_index("hip") == 8
    with pytest.raises(ValueError, match="choose one of"):
        region_index("knee")


@pytest.mark.parametrize("coverage,offset,expected", [
    ({"skull": 0.6, "cervical": 0.1}, 0.1, "head"),
    ({"femur": 0.2, "pelvis_bone": 0.4}, None, "hip"),
    ({"pelvis_bone": 0.3, "sacrum": 0.1, "lumbar": 0.1}, 0.05, "pelvis"),
    ({"thoracic": 0.3, "lung": 0.8}, 0.05, "thoracic_spine"),
    ({"thoracic": 0.3, "lung": 0.8}, 0.4, "thorax"),
    ({"lumbar": 0.2, "thoracic": 0.05, "abdomen": 0.7}, 0.1, "lumbar_spine"),
    ({"cervical": 0.15, "shoulder": 0.3}, 0.2, "cervical_spine"),
    ({"shoulder": 0.3, "thoracic": 0.05, "lung": 0.4}, 0.45, "shoulder"),
    ({"abdomen": 0.5, "lumbar": 0.01}, 0.4, "abdomen"),
    ({"lung": 0.1, "thoracic": 0.03}, 0.45, "thoracic_spine"),
    ({}, None, "lower_limb"),
])
def test_region_rules_on_hand_cases(coverage: dict, offset: float | None, expected: str) -> None:
    assert classify_region(coverage, offset, default="lower_limb") == expected


def test_field_coverage_counts_cells_inside_the_open_field() -> None:
    open_field = np.zeros((64, 64), dtype=np.float32)
    open_field[:, :32] = 1.0  # left half open
    xs, ys = np.meshgrid(np.arange(0, 64, 0.5), np.arange(0, 64, 0.5))
    lung = np.stack([xs.ravel(), ys.ravel()], axis=1)          # covers the whole image
    spine = np.array([[30.0 + dx, y] for y in np.arange(0, 64, 1.0) for dx in (0.0, 1.0)])  # a column
    cov, offset = field_coverage({"lung": lung, "thoracic": spine}, open_field)
    assert cov["lung"] == pytest.approx(1.0)
    assert cov["thoracic"] == pytest.approx(32 / (32 * 16))
    assert offset == pytest.approx(np.hypot(30.5 + 0.0 - 32, 31.75 - 32) / 64, abs=0.02)


def test_labels_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = [
        SynthLabel(pixel_hash="ab" * 32, region="lumbar_spine", height=64, width=64, pixel_spacing_mm=0.9,
                   mask=rng.random((64, 64)) > 0.7,
                   screws=[{"head": [10.5, 20.5], "tip": [40.0, 22.0], "box": [8.0, 15.0, 42.0, 26.0],
                            "visible": True, "end_on": False, "angle_deg": 2.9, "length_px": 29.5,
                            "material": "titanium"}],
                   view={"lao_deg": 10.0, "size": 64}, source="phantom"),
        SynthLabel(pixel_hash="cd" * 32, region="thorax", height=64, width=64, pixel_spacing_mm=1.1,
                   mask=np.zeros((64, 64), dtype=bool), source="phantom"),
    ]
    path = tmp_path / "labels.parquet"
    write_labels(path, labels)
    back = read_labels(path)
    assert len(back) == 2
    for a, b in zip(labels, back):
        assert (a.pixel_hash, a.region, a.region_index, a.height, a.width, a.source) == \
            (b.pixel_hash, b.region, b.region_index, b.height, b.width, b.source)
        assert a.pixel_spacing_mm == b.pixel_spacing_mm and a.screws == b.screws and a.view == b.view
        assert b.mask.dtype == bool and np.array_equal(a.mask, b.mask)
    import pyarrow.parquet as pq

    cols = pq.read_table(path).column_names
    assert cols == ["pixel_hash", "region", "region_index", "height", "width", "pixel_spacing_mm", "mask_png",
                    "screws", "view", "source", "vertebrae_png"]
    assert "patient_name" not in cols


def test_read_labels_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="labels.parquet"):
        read_labels(tmp_path / "labels.parquet")
