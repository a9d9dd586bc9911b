"""PNG / JPEG / TIFF decoding and read_any dispatch on real images."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from xrayfm.conventions import check_image, from_uint16, pixel_hash, to_uint16
from xrayfm.io import DecodeError, FrameSampling, image_format, read_any, read_dicom_frames, read_image_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_testdata import pydicom_file, shared_xray

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def real_radiograph_u16() -> np.ndarray:
    """The RG3 ankle radiograph decoded to the convention, in uint16 storage form."""
    frame = next(read_dicom_frames(pydicom_file("RG3_UNCR.dcm")))
    return to_uint16(frame.image[::4, ::4])


def test_16bit_png_round_trip_is_exact(tmp_path):
    u16 = real_radiograph_u16()
    ok, buf = cv2.imencode(".png", u16)
    assert ok
    path = tmp_path / "ankle16.png"
    path.write_bytes(buf.tobytes())
    f = read_image_file(path)
    check_image(f.image)
    assert np.array_equal(to_uint16(f.image), u16)
    np.testing.assert_array_equal(f.image, from_uint16(u16))
    assert f.raw_hash == pixel_hash(u16)
    assert f.meta["bits_stored"] == 16 and f.meta["format"] == "PNG" and f.meta["rows"] == u16.shape[0]


def test_16bit_tiff_and_8bit_jpeg(tmp_path):
    u16 = real_radiograph_u16()
    _, buf = cv2.imencode(".tif", u16)
    (tmp_path / "a.tif").write_bytes(buf.tobytes())
    assert np.array_equal(to_uint16(read_image_file(tmp_path / "a.tif").image), u16)
    u8 = (u16 >> 8).astype(np.uint8)
    _, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (tmp_path / "a.jpg").write_bytes(buf.tobytes())
    f = read_image_file(tmp_path / "a.jpg")
    assert f.meta["format"] == "JPEG" and f.meta["bits_stored"] == 8
    assert float(np.abs(f.image - u8 / 255.0).mean()) < 0.01  # lossy, but the same image


def test_8bit_png_chest_scaled_by_dtype_range():
    path = shared_xray("chest_pa_nih_00000001_000.png")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    f = read_image_file(path)
    assert raw.dtype == np.uint8 and f.image.shape == raw.shape[:2]
    grey = raw if raw.ndim == 2 else raw[..., 0]
    np.testing.assert_allclose(f.image, grey / 255.0, atol=1e-6)


def test_grey_saved_as_rgb_becomes_grey_and_true_colour_is_rejected(tmp_path):
    grey = (real_radiograph_u16() >> 8).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([grey, grey, grey]))
    f = read_image_file(tmp_path / "rgb.png")
    np.testing.assert_allclose(f.image, grey / 255.0, atol=1e-6)
    colour = np.dstack([grey, grey // 2, 255 - grey])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(DecodeError) as exc:
        read_image_file(tmp_path / "colour.png")
    assert exc.value.reason == "unsupported_photometric" and "colour.png" in str(exc.value)


def test_dark_image_stays_dark(tmp_path):
    dark = (real_radiograph_u16() // 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "dark.png"), dark)
    f = read_image_file(tmp_path / "dark.png")
    assert f.image.max() <= 1 / 16 + 1e-6


def test_bad_images_raise_decode_error(tmp_path):
    _, buf = cv2.imencode(".png", real_radiograph_u16())
    (tmp_path / "cut.png").write_bytes(buf.tobytes()[: len(buf) // 3])
    (tmp_path / "text.png").write_text("not an image\n")
    for name in ("cut.png", "text.png"):
        with pytest.raises(DecodeError) as exc:
            read_image_file(tmp_path / name)
        assert exc.value.reason == "unreadable_image" and name in str(exc.value)
    with pytest.raises(DecodeError) as exc:
        read_image_file(tmp_path / "absent.png")
    assert exc.value.reason == "not_found"


def test_read_any_dispatches_on_content_not_name(tmp_path):
    dcm = pydicom_file("emri_small.dcm")
    (tmp_path / "scan.png").write_bytes(dcm.read_bytes())  # a DICOM with a misleading name
    frames = list(read_any(tmp_path / "scan.png", FrameSampling(every=5)))
    assert [f.frame_index for f in frames] == [0, 5]
    _, buf = cv2.imencode(".png", real_radiograph_u16())
    (tmp_path / "image.dcm").write_bytes(buf.tobytes())
    assert image_format(tmp_path / "image.dcm") == "PNG"
    assert len(list(read_any(tmp_path / "image.dcm"))) == 1
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DecodeError) as exc:
        read_any(tmp_path / "notes.txt")
    assert exc.value.reason == "unsupported_format"


def test_dicom_and_png_of_the_same_pixels_agree(tmp_path):
    path = shared_xray("chest_cr_siim_sternotomy_wires.dcm")
    raw = pydicom.dcmread(path).pixel_array
    cv2.imwrite(str(tmp_path / "same.png"), raw)
    a = next(read_any(path))
    b = next(read_any(tmp_path / "same.png"))
    assert a.raw_hash == b.raw_hash
    np.testing.assert_array_equal(a.image, b.image)
    assert set(b.meta) >= set(a.meta)  # one schema for both
