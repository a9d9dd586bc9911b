"""DICOM SR (TID 1500) of real predictions on real DICOM files, read back with highdicom."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.sr.codedict import codes
from xray_images import pydicom_data_file

from xrayfm.cli import main

hd = pytest.importorskip("highdicom", reason="highdicom is needed for DICOM SR output")
pydicom = pytest.importorskip("pydicom")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def low_threshold_bundle(bundle_dir: Path) -> Any:
    """The shared tiny bundle with low operating points, so that its predictions hold screws and metal."""
    from xrayfm.models.bundle import ModelBundle

    bundle = ModelBundle.load(bundle_dir)
    bundle.options.update(detect_threshold=0.01, mask_threshold=0.3)
    return bundle


def _predict(bundle: Any, path: Path, frame_index: int = 0) -> dict[str, Any]:
    from xrayfm.io import read_any
    from xrayfm.serve.results import frame_spacing

    frame = next(f for f in read_any(path) if f.frame_index == frame_index)
    return bundle.predict([frame.image], [frame_spacing(frame)])[0]


def _measurements(group: Any) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def test_sr_of_cr_with_spacing_references_source_and_seg(tmp_path: Path, low_threshold_bundle: Any) -> None:
    from xrayfm.serve.dicom_seg import metal_segmentation_bytes
    from xrayfm.serve.dicom_sr import METAL_CODE, REGION_CODES, SCREW_CODE, findings_sr_bytes

    src = tmp_path / "RG1_UNCR.dcm"  # real CR pixels; PixelSpacing set (the original says 0, unknown)
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    ds.PixelSpacing = [0.2, 0.1]
    ds.save_as(src)
    res = _predict(low_threshold_bundle, src)
    assert res["screws"] and res["metal_mask"].any(), "the low operating points should give screws and metal"
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(metal_segmentation_bytes(src, res["metal_mask"], "vit_tiny_patch16", "9.9"))
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(findings_sr_bytes(src, res, "vit_tiny_patch16", "9.9", seg_path))

    sr = hd.sr.srread(sr_path)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert isinstance(sr, hd.sr.ComprehensiveSR) and sr.Modality == "SR"
    assert (sr.PatientID, sr.StudyInstanceUID) == (ds.PatientID, ds.StudyInstanceUID)
    evidence = {uid for _, _, uid, _ in sr.get_evidence(current_procedure_only=True)}
    assert evidence == {ds.SOPInstanceUID, seg.SOPInstanceUID}
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    assert observer.observer_identifying_attributes.name == "xrayfm vit_tiny_patch16"

    (region,) = sr.content.get_image_measurement_groups(referenced_sop_instance_uid=ds.SOPInstanceUID)
    (top1,) = region.get_qualitative_evaluations()
    assert top1.value.value == REGION_CODES[res["top3"][0]["region"]].value
    probs = [(m.finding_sites[0].value.value, m.value) for m in region.get_measurements()]
    assert probs == [(REGION_CODES[t["region"]].value, pytest.approx(t["probability"])) for t in res["top3"]]

    screws = sr.content.get_planar_roi_measurement_groups(
        finding_type=SCREW_CODE, referenced_sop_instance_uid=ds.SOPInstanceUID
    )
    assert len(screws) == len(res["screws"])
    for group, screw in zip(screws, res["screws"]):
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        # xrayfm points and DICOM SCOORDs share the pixel convention (centre of pixel (0, 0) is 0.5, 0.5)
        np.testing.assert_allclose(group.roi.value, [screw["head"], screw["tip"]], rtol=1e-6)
        m = _measurements(group)
        assert m["Length"][1] == "mm" and m["Length"][0] == pytest.approx(screw["length_mm"], rel=1e-6)
        assert m["Angle"] == (pytest.approx(screw["angle_deg"]), "deg")
        assert m["Certainty of Finding"] == (pytest.approx(100 * screw["confidence"]), "%")

    (metal,) = sr.content.get_planar_roi_measurement_groups(finding_type=METAL_CODE)
    frame_ref = metal.referenced_segmentation_frame
    assert frame_ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert _measurements(metal)["Area"] == (pytest.approx(res["metal_mask"].sum() * 0.2 * 0.1), "mm2")


def test_sr_of_multiframe_references_the_frame_and_uses_pixels(
    tmp_path: Path, low_threshold_bundle: Any
) -> None:
    from xrayfm.serve.dicom_sr import METAL_CODE, SCREW_CODE, findings_sr_bytes

    src = pydicom_data_file("emri_small.dcm")  # real MR, 10 frames, no pixel spacing
    res = _predict(low_threshold_bundle, src, frame_index=3)
    assert res["screws"] and res["metal_mask"].any()
    path = tmp_path / "sr.dcm"
    path.write_bytes(findings_sr_bytes(src, res, "vit_tiny_patch16", "9.9", frame_index=3))
    sr = hd.sr.srread(path)
    screws = sr.content.get_planar_roi_measurement_groups(finding_type=SCREW_CODE)
    assert len(screws) == len(res["screws"])
    for group, screw in zip(screws, res["screws"]):
        assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 4
        length = float(np.hypot(*np.subtract(screw["tip"], screw["head"])))
        assert _measurements(group)["Length"] == (pytest.approx(length, rel=1e-6), "{pixels}")
    (metal,) = sr.content.get_image_measurement_groups(finding_type=METAL_CODE)
    assert _measurements(metal)["Area"] == (float(res["metal_mask"].sum()), "{pixels}")
    assert metal.source_images[0].referenced_frame_numbers == [4]


def test_sr_refuses_mismatched_inputs(tmp_path: Path, low_threshold_bundle: Any) -> None:
    from xrayfm.serve.dicom_seg import metal_segmentation_bytes
    from xrayfm.serve.dicom_sr import findings_sr_bytes

    rg1, rg3 = pydicom_data_file("RG1_UNCR.dcm"), pydicom_data_file("RG3_UNCR.dcm")
    res = _predict(low_threshold_bundle, rg1)
    with pytest.raises(ValueError, match="pass the prediction of this file"):
        findings_sr_bytes(rg3, res, "m", "1")
    with pytest.raises(ValueError, match="outside its 1 frame"):
        findings_sr_bytes(rg1, res, "m", "1", frame_index=1)
    other_seg = tmp_path / "other_seg.dcm"
    mask3 = _predict(low_threshold_bundle, rg3)["metal_mask"]
    other_seg.write_bytes(metal_segmentation_bytes(rg3, mask3, "m", "1"))
    with pytest.raises(ValueError, match="is not a one-frame SEG of"):
        findings_sr_bytes(rg1, res, "m", "1", other_seg)


def test_region_codes_cover_every_region() -> None:
    from xrayfm.serve.dicom_sr import LOCAL_SCHEME, region_code
    from xrayfm.synth.regions import REGIONS

    sct = [region_code(r) for r in REGIONS]
    assert all(c.scheme_designator == "SCT" for c in sct)
    assert len({c.value for c in sct}) == len(REGIONS)  # no two regions share a code
    assert region_code("forearm_custom").scheme_designator == LOCAL_SCHEME


def test_predict_cli_writes_dicom_sr(
    tmp_path: Path, bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    from xrayfm.serve.dicom_sr import SCREW_CODE

    rg1 = pydicom_data_file("RG1_UNCR.dcm")
    mf = pydicom_data_file("emri_small.dcm")
    png = tmp_path / "small.png"
    cv2.imwrite(str(png), np.random.default_rng(0).integers(0, 255, (40, 56), dtype=np.uint8))
    out = tmp_path / "out"
    args = [str(rg1), str(mf), str(png), "--model", str(bundle_dir), "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main(["predict", *args, "--dicom-seg", "--dicom-sr", "--max-frames", "2", "--no-overlay"])
    text = capsys.readouterr().out
    assert done.value.code in (0, None), text

    fr = json.loads((out / "RG1_UNCR.json").read_text())["frames"][0]
    assert fr["dicom_sr"] == "RG1_UNCR_sr.dcm"
    sr = hd.sr.srread(out / fr["dicom_sr"])
    src = pydicom.dcmread(rg1, stop_before_pixels=True)
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    screws = sr.content.get_planar_roi_measurement_groups(
        finding_type=SCREW_CODE, referenced_sop_instance_uid=src.SOPInstanceUID
    )
    assert len(screws) == len(fr["screws"])
    if fr["metal"]["area_px"]:  # the SEG of the same run is referenced as evidence
        seg_uid = pydicom.dcmread(out / fr["dicom_seg"], stop_before_pixels=True).SOPInstanceUID
        assert seg_uid in {uid for _, _, uid, _ in sr.get_evidence()}
    multi = json.loads((out / "emri_small.json").read_text())["frames"]
    assert [f["dicom_sr"] for f in multi] == [f"emri_small_f{f['frame_index']:04d}_sr.dcm" for f in multi]
    assert all((out / f["dicom_sr"]).is_file() for f in multi)
    assert "dicom_sr" not in json.loads((out / "small.json").read_text())["frames"][0]
