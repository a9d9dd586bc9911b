"""``xrayfm decode`` on real files: PNGs equal the decoded frames, metadata and refusals recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import pytest

from xrayfm.cli import main
from xrayfm.conventions import to_uint16
from xrayfm.io import FrameSampling, read_dicom_frames

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_testdata import pydicom_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_decode_writes_frames_metadata_and_refusals(tmp_path, capsys):
    multi, palette = pydicom_file("emri_small_RLE.dcm"), pydicom_file("OBXXXX1A.dcm")
    out = tmp_path / "out"
    assert run(["decode", str(multi), str(palette), "-o", str(out), "--max-frames", "3"]) == 0
    assert "decoded 3 frames from 1 of 2 files" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    expected = list(read_dicom_frames(multi, FrameSampling(max_frames=3)))
    assert [r["frame_index"] for r in rows] == [f.frame_index for f in expected] == [1, 5, 8]
    for row, frame in zip(rows, expected):
        png = cv2.imread(str(out / row["png"]), cv2.IMREAD_UNCHANGED)
        assert (png == to_uint16(frame.image)).all()
        assert row["raw_hash"] == frame.raw_hash and row["meta"]["num_frames"] == 10
    refused = [json.loads(line) for line in (out / "refused.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in refused] == ["unsupported_photometric"]
    assert (out / "config.yaml").is_file() and (out / "run.json").is_file()


def test_decode_user_errors_are_one_line(tmp_path, capsys):
    assert run(["decode", str(tmp_path / "absent"), "-o", str(tmp_path / "o")]) == 2
    assert run(["decode", str(pydicom_file("MR_small.dcm")), "-o", str(tmp_path / "o"), "--every", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: source {tmp_path / 'absent'} does not exist; pass existing files or folders",
                   "error: --every must be an integer >= 1, got 0"]
