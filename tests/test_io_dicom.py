"""DICOM decoding on real files: orientation, exactness, sampling, VOI, metadata, errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian

from xrayfm.conventions import check_image, pixel_hash, to_uint16
from xrayfm.io import DecodeError, FrameSampling, is_dicom, read_any, read_dicom_frames
from xrayfm.io.intensity import area_resize, resized_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_testdata import pydicom_file, shared_xray

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def one(src, **kw):
    frames = list(read_dicom_frames(src, **kw))
    assert len(frames) == 1
    check_image(frames[0].image)
    return frames[0]


def chest_contrast(img: np.ndarray) -> float:
    """Mean of the mediastinum/spine strip minus mean of both lung fields (PA chest, mid-height)."""
    h, w = img.shape
    rows = slice(int(0.30 * h), int(0.60 * h))
    centre = img[rows, int(0.45 * w):int(0.55 * w)].mean()
    lungs = np.concatenate([img[rows, int(0.20 * w):int(0.35 * w)].ravel(),
                            img[rows, int(0.65 * w):int(0.80 * w)].ravel()]).mean()
    return float(centre - lungs)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KI.dcm"])
def test_monochrome1_chest_comes_out_bone_bright(name):
    f = one(pydicom_file(name))
    assert f.meta["photometric"] == "MONOCHROME1"
    # Mediastinum and spine attenuate more than air-filled lungs: brighter by a clear margin.
    assert chest_contrast(f.image) > 0.08
    raw = pydicom.dcmread(pydicom_file(name)).pixel_array
    assert chest_contrast(raw.astype(np.float32)) < 0  # the stored values have it the other way round


@pytest.mark.parametrize("name", ["chest_cr_siim_sternotomy_wires.dcm", "chest_pa_nih_00000001_000.png"])
def test_monochrome2_chests_agree_with_the_convention(name):
    f = next(read_any(shared_xray(name)))
    assert chest_contrast(f.image) > 0.08


def test_monochrome1_is_exactly_inverted_by_bit_range():
    path = shared_xray("animal_thorax_dx_highdicom.dcm")
    f = one(path)
    raw = pydicom.dcmread(path).pixel_array
    assert f.meta["photometric"] == "MONOCHROME1" and f.meta["bits_stored"] == 8
    np.testing.assert_allclose(f.image, 1.0 - raw.astype(np.float32) / 255.0, atol=1e-6)


@pytest.mark.parametrize("stem", ["RG1", "RG3"])
def test_j2k_lossless_decodes_exactly_like_uncompressed(stem):
    unc = one(pydicom_file(f"{stem}_UNCR.dcm"))
    j2k = one(pydicom_file(f"{stem}_J2KR.dcm"))
    assert j2k.meta["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.90"
    assert unc.raw_hash == j2k.raw_hash
    assert np.array_equal(unc.image, j2k.image)
    lossy = one(pydicom_file(f"{stem}_J2KI.dcm"))
    assert not np.array_equal(unc.image, lossy.image)
    assert float(np.abs(unc.image - lossy.image).mean()) < 0.01


def test_scaling_uses_the_bit_range_not_the_image_range(tmp_path):
    # An under-exposed copy of the 10-bit ankle must stay dark, not be stretched to full range.
    ds = pydicom.dcmread(pydicom_file("RG3_UNCR.dcm"))
    raw = ds.pixel_array
    ds.PixelData = (raw // 4).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "dark.dcm")
    f = one(tmp_path / "dark.dcm")
    assert f.meta["bits_stored"] == 10
    np.testing.assert_allclose(f.image, (raw // 4).astype(np.float32) / 1023.0, atol=1e-6)
    assert f.image.max() <= 0.25


def test_signed_data_with_rescale_uses_the_signed_bit_range():
    path = pydicom_file("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) == -1024
    f = one(path)
    lo, hi = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    np.testing.assert_allclose(f.image, (ds.pixel_array.astype(np.float64) - lo) / (hi - lo), atol=1e-6)
    assert f.meta["rescale_intercept"] == -1024.0 and f.meta["rescale_slope"] == 1.0


def pydicom_voi_reference(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's own VOI of the modality values, scaled from its output range to [0, 1]."""
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    out = apply_voi_lut(ds.pixel_array * slope + intercept, ds)
    if "VOILUTSequence" in ds:
        lo, hi = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    else:  # pydicom's window output spans the stored range mapped through the rescale
        b = ds.BitsStored
        lo, hi = (-(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1) if ds.PixelRepresentation else (0.0, 2.0**b - 1)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    ref = (out - lo) / (hi - lo)
    return 1.0 - ref if ds.PhotometricInterpretation == "MONOCHROME1" else ref


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "RG3_UNCR.dcm", "examples_overlay.dcm", "vlut_04.dcm"])
def test_voi_matches_pydicom_and_is_applied_only_on_request(name):
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    plain = one(path)
    voi = one(path, apply_voi=True)
    assert plain.meta["voi_applied"] is False and voi.meta["voi_applied"] is True
    assert voi.raw_hash == plain.raw_hash
    if "WindowCenter" in ds:
        wc = ds["WindowCenter"]
        assert plain.meta["window_center"] == float(wc.value[0] if wc.VM > 1 else wc.value)
    np.testing.assert_allclose(voi.image, pydicom_voi_reference(ds), atol=2e-3)
    if "WindowCenter" in ds:  # (vlut_04's LUT is close to the identity)
        assert not np.allclose(voi.image, plain.image, atol=2e-3)


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"])
@pytest.mark.parametrize(("sampling", "expected"), [
    (FrameSampling(), list(range(10))),
    (FrameSampling(every=3), [0, 3, 6, 9]),
    (FrameSampling(max_frames=2), [2, 7]),
    (FrameSampling(every=2, max_frames=3), [0, 4, 8]),
    (FrameSampling(max_frames=1), [5]),
])
def test_multiframe_sampling_picks_the_right_frames(name, sampling, expected):
    path = pydicom_file(name)
    all_frames = pydicom.dcmread(path).pixel_array
    assert all_frames.shape[0] == 10
    frames = list(read_dicom_frames(path, sampling))
    assert [f.frame_index for f in frames] == expected
    assert all(f.num_frames == 10 and f.meta["frame_index"] == f.frame_index for f in frames)
    for f in frames:
        assert f.raw_hash == pixel_hash(all_frames[f.frame_index])
        np.testing.assert_allclose(f.image, all_frames[f.frame_index] / (2.0 ** f.meta["bits_stored"] - 1),
                                   atol=1e-6)


def test_dataset_input_equals_path_input():
    path = pydicom_file("emri_small_RLE.dcm")
    by_path = list(read_dicom_frames(path, FrameSampling(every=4)))
    by_ds = list(read_dicom_frames(pydicom.dcmread(path), FrameSampling(every=4)))
    assert [f.raw_hash for f in by_path] == [f.raw_hash for f in by_ds]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(by_path, by_ds))


def test_frame_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match="every"):
        FrameSampling(every=0)
    with pytest.raises(ValueError, match="max_frames"):
        FrameSampling(max_frames=0)


def test_meta_is_technical_json_and_carries_no_identity():
    path = pydicom_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    f = one(path)
    text = json.dumps(f.meta)
    m = f.meta
    assert (m["modality"], m["body_part"], m["view_position"]) == ("CR", "CHEST", "PA")
    assert (m["rows"], m["cols"], m["bits_stored"], m["bits_allocated"]) == (1955, 1841, 15, 16)
    assert m["kvp"] == 150.0 and m["exposure_mas"] == 2.0 and m["exposure_time_ms"] == 8.0
    assert m["distance_source_to_detector_mm"] == 1996.0
    assert (m["window_center"], m["window_width"]) == (15000.0, 30000.0)
    assert m["pixel_spacing_mm"] is None and m["spacing_source"] is None  # the file says [0, 0]
    assert m["manufacturer"] == "Philips Medical Systems" and m["device_serial_number"] == "92.00.003"
    assert m["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.1"
    for secret in (str(ds.PatientName), ds.PatientID, ds.StudyDate, ds.SOPInstanceUID, ds.StudyInstanceUID,
                   ds.InstitutionName, str(ds.ReferringPhysicianName), ds.PatientBirthDate):
        assert secret not in text


def test_spacing_prefers_pixel_spacing_then_corrected_imager_spacing(tmp_path):
    ds = pydicom.dcmread(pydicom_file("RG3_UNCR.dcm"))
    assert "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.save_as(tmp_path / "imager.dcm")
    f = one(tmp_path / "imager.dcm")
    assert f.meta["pixel_spacing_mm"] == [0.2, 0.2] and f.meta["spacing_source"] == "imager_pixel_spacing"
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    ds.save_as(tmp_path / "mag.dcm")
    f = one(tmp_path / "mag.dcm")
    assert f.meta["spacing_source"] == "imager_corrected"
    np.testing.assert_allclose(f.meta["pixel_spacing_mm"], [0.16, 0.16])
    ds.PixelSpacing = [0.15, 0.14]
    ds.save_as(tmp_path / "ps.dcm")
    f = one(tmp_path / "ps.dcm")
    assert f.meta["pixel_spacing_mm"] == [0.15, 0.14] and f.meta["spacing_source"] == "pixel_spacing"


def test_grey_stored_as_rgb_is_accepted_true_colour_rejected(tmp_path):
    ds = pydicom.dcmread(pydicom_file("RG3_UNCR.dcm"))
    grey = (ds.pixel_array[::8, ::8] >> 2).astype(np.uint8)
    ds.set_pixel_data(np.repeat(grey[..., None], 3, axis=2), "RGB", 8)
    ds.save_as(tmp_path / "rgb_grey.dcm")
    f = one(tmp_path / "rgb_grey.dcm")
    np.testing.assert_allclose(f.image, grey / 255.0, atol=1e-6)
    with pytest.raises(DecodeError) as exc:
        list(read_dicom_frames(pydicom_file("SC_rgb.dcm")))
    assert exc.value.reason == "unsupported_photometric"
    with pytest.raises(DecodeError) as exc:
        read_dicom_frames(pydicom_file("OBXXXX1A_2frame.dcm"))
    assert exc.value.reason == "unsupported_photometric" and "PALETTE COLOR" in str(exc.value)


def expect_error(src, *reasons: str) -> DecodeError:
    with pytest.raises(DecodeError) as exc:
        list(read_dicom_frames(src))
    err = exc.value
    assert err.reason in reasons, str(err)
    assert "\n" not in str(err) and ";" in str(err)  # one line: the problem; the fix
    if isinstance(src, (str, Path)):
        assert str(src) in str(err)
    return err


@pytest.mark.parametrize(("name", "frac"), [("RG3_UNCR.dcm", 0.6), ("RG1_J2KR.dcm", 0.5),
                                            ("RG1_J2KR.dcm", 0.99)])
def test_truncated_files_raise_decode_error(tmp_path, name, frac):
    data = pydicom_file(name).read_bytes()
    p = tmp_path / "cut.dcm"
    p.write_bytes(data[: int(len(data) * frac)])
    # pydicom returns an empty dataset when the file ends inside encapsulated pixel data
    expect_error(p, "corrupt_pixel_data", "corrupt_header")


def test_corrupt_compressed_stream_raises_decode_error(tmp_path):
    src = shared_xray("chest_cr_siim_sternotomy_wires.dcm")
    ds = pydicom.dcmread(src)
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    frame[2:600] = b"\x00" * 598  # wipe the JPEG tables and frame header
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "bad.dcm")
    expect_error(tmp_path / "bad.dcm", "corrupt_pixel_data")


def test_not_dicom_no_pixels_and_unsupported_syntax(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("this is a text file, not an image\n" * 20)
    expect_error(text, "not_dicom")
    assert not is_dicom(text)
    expect_error(tmp_path / "missing.dcm", "not_found")
    expect_error(pydicom_file("rtplan.dcm"), "no_pixel_data")
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    err = expect_error(ds, "unsupported_transfer_syntax")
    assert "<in-memory dataset>" in str(err) or str(ds.filename) in str(err)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert one(ds).meta["modality"] == "MR"


def test_is_dicom():
    assert is_dicom(pydicom_file("RG1_UNCR.dcm"))
    assert is_dicom(pydicom_file("ExplVR_LitEndNoMeta.dcm"))  # bare dataset, no preamble
    assert not is_dicom(pydicom_file("README.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not is_dicom(Path(__file__))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_retain_freed_memory_is_accepted_by_glibc():
    import subprocess

    code = "from xrayfm.io import retain_freed_memory; raise SystemExit(0 if retain_freed_memory() else 3)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_enhanced_multiframe_reads_functional_groups():
    path = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds and "PixelSpacing" not in ds  # only inside functional groups
    frames = list(read_dicom_frames(path, apply_voi=True))
    assert [f.frame_index for f in frames] == [0, 1]
    for f in frames:
        m = f.meta
        assert m["spacing_source"] == "pixel_spacing" and m["pixel_spacing_mm"] == [0.388672, 0.388672]
        assert (m["rescale_slope"], m["rescale_intercept"]) == (1.0, -1024.0)
        assert (m["window_center"], m["window_width"], m["voi_applied"]) == (49.0, 102.0, True)


@pytest.mark.parametrize(("name", "max_side", "voi"), [
    ("RG1_UNCR.dcm", 512, False),  # MONOCHROME1 15-bit chest CR
    ("RG3_UNCR.dcm", 512, False),  # 10-bit ankle CR
    ("RG3_UNCR.dcm", 301, False),
    ("CT_small.dcm", 48, False),  # signed, rescale slope/intercept
    ("RG3_UNCR.dcm", 512, True),  # VOI window: mapped at full size, then resized
])
def test_resize_in_reader_equals_map_then_resize(name: str, max_side: int, voi: bool) -> None:
    """``max_side`` resizes before the affine intensity map: same stored uint16 as the reference
    path (map at full size, then cv2 INTER_AREA) up to float32 rounding: at most 1 of 65535, on a
    few pixels."""
    path = pydicom_file(name)
    full = one(path, apply_voi=voi)
    small = one(path, apply_voi=voi, max_side=max_side)
    size = resized_shape(*full.image.shape, max_side)
    assert small.image.shape == size and max(size) == max_side
    assert small.source_shape == full.source_shape == full.image.shape
    assert small.raw_hash == full.raw_hash and small.meta == full.meta
    assert small.meta["voi_applied"] is voi
    ref = cv2.resize(full.image, size[::-1], interpolation=cv2.INTER_AREA)
    ref = to_uint16(np.clip(ref, 0.0, 1.0)).astype(np.int32)
    diff = np.abs(to_uint16(small.image).astype(np.int32) - ref)
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01


@pytest.mark.parametrize(("shape", "size"), [
    ((1955, 1841), (512, 482)), ((1760, 1760), (512, 512)), ((100, 90), (33, 29)), ((64, 64), (64, 16)),
    ((1000, 3), (999, 2)), ((513, 512), (512, 511)), ((30, 30), (1, 1)), ((96, 64), (32, 64)),
])
def test_area_resize_equals_opencv_inter_area(shape: tuple[int, int], size: tuple[int, int]) -> None:
    img = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    got = area_resize(img, size)
    ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_AREA)
    assert got.dtype == np.float32 and got.shape == size
    assert np.abs(got - ref).max() < 1e-6
    assert area_resize(img, shape) is img
    with pytest.raises(ValueError, match="only shrinks"):
        area_resize(img, (shape[0] + 1, shape[1]))
