"""Every file in pydicom's test set (and pydicom-data) decodes or raises DecodeError, nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from xrayfm.conventions import check_image
from xrayfm.io import DecodeError, FrameSampling, read_dicom_frames

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_testdata import pydicom_test_dirs

FILES = sorted(p for d in pydicom_test_dirs() for p in d.rglob("*") if p.is_file() and p.suffix != ".py")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_file_decodes_or_raises_decode_error(path: Path):
    try:
        frames = list(read_dicom_frames(path, FrameSampling(max_frames=3)))
    except DecodeError as exc:
        assert exc.reason and exc.reason.replace("_", "").isalpha()
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert frames and all(f.num_frames >= len(frames) for f in frames)
    for f in frames:
        check_image(f.image)
        assert len(f.raw_hash) == 64
        assert f.meta["frame_index"] == f.frame_index
        json.dumps(f.meta, allow_nan=False)


@pytest.mark.filterwarnings("ignore")
def test_the_test_set_is_present_and_mostly_images():
    if len(FILES) < 50:
        pytest.skip("pydicom's test files are not installed with this pydicom")
    decoded = 0
    for path in FILES:
        try:
            decoded += bool(list(read_dicom_frames(path, FrameSampling(max_frames=1))))
        except DecodeError:
            pass
    assert decoded >= 60  # ~190 files, of which colour, palette, non-image and broken ones are refused
