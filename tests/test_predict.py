"""`xrayfm predict` end to end on real DICOM (single and multi-frame), PNG and folders; RLE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from io_testdata import SHARED_XRAY
from xray_images import pydicom_data_file

from xrayfm.cli import main
from xrayfm.serve.results import aggregate, rle_decode, rle_encode


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    cap = capsys.readouterr()
    return int(done.value.code or 0), cap.out + cap.err


def test_rle_round_trip_and_coco_layout() -> None:
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[1, 0] = m[2, 3] = True
    rle = rle_encode(m)
    assert rle == {"size": [3, 4], "counts": [0, 2, 9, 1]}  # column-major, starts with a 0-run
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (5, 7), (64, 33)]:
        for p in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < p
            back = rle_decode(rle_encode(mask))
            assert back.shape == shape and np.array_equal(back, mask)
    with pytest.raises(ValueError, match="corrupt"):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_aggregate_means_region_probabilities() -> None:
    frames = [
        {"probabilities": {"a": 0.8, "b": 0.2}, "metal": {"area_px": 0}, "screws": []},
        {"probabilities": {"a": 0.2, "b": 0.6}, "metal": {"area_px": 5}, "screws": [{}, {}]},
    ]
    agg = aggregate(frames)
    assert agg["frames"] == 2 and agg["top3"][0] == {"index": 0, "region": "a", "probability": 0.5}
    assert agg["probabilities_mean"]["b"] == pytest.approx(0.4)
    assert agg["frames_with_metal"] == 1 and agg["max_screws_per_frame"] == 2


def test_predict_dicom_png_multiframe_folder(
    tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pydicom

    rg1 = tmp_path / "RG1_UNCR.dcm"  # real CR pixels; PixelSpacing set (the original says 0, unknown)
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    ds.PixelSpacing = [0.2, 0.1]
    ds.save_as(rg1)
    mf = pydicom_data_file("emri_small.dcm")  # real MR, 10 frames
    png = tmp_path / "ankle.png"
    a = pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm")).pixel_array.astype(np.float64)
    cv2.imwrite(str(png), (255 * (a - a.min()) / np.ptp(a)).astype(np.uint8)[::4, ::4])
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(png, folder / "sub" / "copy.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, text = _run(
        capsys,
        "predict",
        str(rg1),
        str(mf),
        str(png),
        str(folder),
        "--model",
        str(bundle_dir),
        "--out",
        str(out),
        "--max-frames",
        "4",
    )
    assert code == 1, text  # one input failed; the others were predicted
    assert "from 4 of 5 file(s) (1 failed)" in text
    lines = text.splitlines()  # the error is ONE line naming the file and the fix
    assert any(ln.startswith("error: ") and "notes.txt" in ln and ln.endswith("TIFF image") for ln in lines)

    doc = json.loads((out / "RG1_UNCR.json").read_text())
    fr = doc["frames"][0]
    assert doc["num_frames"] == 1 and "aggregate" not in doc
    assert (fr["height"], fr["width"]) == pydicom.dcmread(rg1).pixel_array.shape
    assert len(fr["top3"]) == 3 and fr["pixel_spacing_mm"] == [0.2, 0.1]
    mask = cv2.imread(str(out / fr["metal"]["mask_png"]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (fr["height"], fr["width"])
    assert np.array_equal(rle_decode(fr["metal"]["mask_rle"]), mask > 0)
    overlay = cv2.imread(str(out / fr["overlay_png"]))
    assert overlay.shape == (fr["height"], fr["width"], 3)
    for s in fr["screws"]:
        assert 0 <= s["confidence"] <= 1 and len(s["box"]) == 4
        dx, dy = np.subtract(s["tip"], s["head"])
        assert s["length_mm"] == pytest.approx(np.hypot(0.1 * dx, 0.2 * dy), abs=0.02)

    multi = json.loads((out / "emri_small.json").read_text())
    assert multi["num_frames"] == 10 and len(multi["frames"]) == 4
    assert [f["frame_index"] for f in multi["frames"]] == [1, 3, 6, 8]
    assert multi["aggregate"]["frames"] == 4 and len(multi["aggregate"]["top3"]) == 3
    assert (out / "emri_small_f0001_overlay.png").is_file()

    p = json.loads((out / "ankle.json").read_text())["frames"][0]
    assert (p["height"], p["width"]) == cv2.imread(str(png), 0).shape and p["pixel_spacing_mm"] is None
    assert all("length_mm" not in s for s in p["screws"])
    assert (out / "sub__copy.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["command"][-1] == "predict" or len(run["command"]) <= 2  # no patient paths recorded
    assert (out / "config.yaml").is_file()


def test_predict_shared_sternotomy_dicom(
    tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dcm = SHARED_XRAY / "chest_cr_siim_sternotomy_wires.dcm"
    if not dcm.is_file():
        pytest.skip(f"{dcm} absent (team data in ../shared is not available here)")
    code, text = _run(capsys, "predict", str(dcm), "--model", str(bundle_dir), "--out", str(tmp_path))
    assert code == 0, text
    fr = json.loads((tmp_path / f"{dcm.stem}.json").read_text())["frames"][0]
    assert (fr["height"], fr["width"]) == (1024, 1024)


def test_predict_errors(tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run(
        capsys, "predict", str(tmp_path / "missing.dcm"), "--model", str(bundle_dir), "--out", str(tmp_path)
    )
    assert code != 0 and "does not exist" in text
    code, text = _run(
        capsys, "predict", str(pydicom_data_file("RG1_UNCR.dcm")), "--model", str(tmp_path), "--out", str(tmp_path)
    )
    assert code != 0 and "not a model bundle" in text


def test_file_predictor_batches_across_files_and_drops_failed_files(tmp_path: Path, bundle_dir: Path) -> None:
    from xrayfm.io import DecodeError
    from xrayfm.models.bundle import ModelBundle
    from xrayfm.serve.files import FilePredictor, list_inputs

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(src / name), rng.integers(0, 255, (40, 56), dtype=np.uint8))
    data = pydicom_data_file("emri_small.dcm").read_bytes()
    (src / "b_truncated.dcm").write_bytes(data[: len(data) - 30000])  # real MR, pixel data cut short
    bundle = ModelBundle.load(bundle_dir)
    passes: list[int] = []
    bundle.backbone.model.patch_embed.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    errors: list[DecodeError] = []
    files_seen: list[int] = []
    runner = FilePredictor(
        bundle, tmp_path / "out", batch_size=16, on_error=errors.append, on_file=lambda: files_seen.append(1)
    )
    runner.run(list_inputs([src]))
    assert passes == [2]  # both PNGs in one backbone pass; no frame of the broken file
    assert runner.frames_done == 2 and runner.files_failed == 1 and len(files_seen) == 3
    assert len(errors) == 1 and "b_truncated.dcm" in str(errors[0])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["a.json", "c.json"]


def test_predict_writes_dicom_seg_for_single_frame_dicom(
    tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hd = pytest.importorskip("highdicom", reason="highdicom is needed for DICOM SEG output")
    import pydicom

    rg1 = pydicom_data_file("RG1_UNCR.dcm")
    mf = pydicom_data_file("emri_small.dcm")
    out = tmp_path / "out"
    code, text = _run(
        capsys,
        "predict",
        str(rg1),
        str(mf),
        "--model",
        str(bundle_dir),
        "--out",
        str(out),
        "--dicom-seg",
        "--max-frames",
        "2",
        "--no-overlay",
    )
    assert code == 0, text
    assert text.count("no DICOM SEG for emri_small.dcm: multi-frame") == 1
    fr = json.loads((out / "RG1_UNCR.json").read_text())["frames"][0]
    seg = hd.seg.segread(out / fr["dicom_seg"])
    src = pydicom.dcmread(rg1, stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID
    assert (
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        == src.SOPInstanceUID
    )
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "425620007"
    seg_mask = seg.get_pixels_by_source_instance([src.SOPInstanceUID], combine_segments=True)[0] > 0
    assert np.array_equal(seg_mask, rle_decode(fr["metal"]["mask_rle"]))
    assert not list(out.glob("emri_small*_seg.dcm"))


def test_predict_bf16_agrees_with_fp32(tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--precision bf16`: same top region as fp32 on a real radiograph, and the run record says
    what ran (bf16 where the CPU has fast bf16)."""
    import torch
    import yaml

    from xrayfm.models.runtime import resolve_precision

    rg3 = pydicom_data_file("RG3_UNCR.dcm")
    docs = {}
    for prec in ("fp32", "bf16"):
        code, text = _run(capsys, "predict", str(rg3), "--model", str(bundle_dir), "--out", str(tmp_path / prec),
                          "--precision", prec, "--no-overlay")
        assert code == 0, text
        docs[prec] = json.loads((tmp_path / prec / "RG3_UNCR.json").read_text())["frames"][0]
        ran = yaml.safe_load((tmp_path / prec / "config.yaml").read_text())["bundle"]["precision"]
        fast = resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
        assert ran == ("bf16" if prec == "bf16" and fast else "fp32")
    assert docs["fp32"]["top3"][0]["region"] == docs["bf16"]["top3"][0]["region"]
    code, text = _run(capsys, "predict", str(rg3), "--model", str(bundle_dir), "--out", str(tmp_path / "x"),
                      "--precision", "fp8")
    assert code == 2 and "precision must be one of auto, bf16, fp32, got 'fp8'" in text
