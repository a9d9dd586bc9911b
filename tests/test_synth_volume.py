"""CT volume loading: NIfTI with label names, a DICOM CT series (LPS -> RAS), raw arrays, bad inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xrayfm.io.volume import VolumeError, load_volume
from xrayfm.synth.anatomy import TOTALSEG_V1_NAMES

SHARED_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


def _write_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float], origin_lps: np.ndarray) -> None:
    """Axial CT slices (rows = y, cols = x in LPS), int16 with slope 1 / intercept -1024, shuffled order."""
    series = generate_uid()
    order = np.random.default_rng(0).permutation(hu.shape[2])
    for k in order:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.Modality = series, "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in origin_lps + np.array([0, 0, k * spacing[2]])]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T + 1024).astype("<i2").tobytes()
        pydicom.dcmwrite(folder / f"s{k:03d}.dcm", ds, enforce_file_format=True)
    (folder / "README.txt").write_text("not dicom")


def test_dicom_series_is_sorted_and_converted_to_ras(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1500, size=(12, 10, 6)).astype(np.float32)
    origin = np.array([-30.0, -20.0, 100.0])
    _write_series(tmp_path, hu, (0.8, 0.9, 2.0), origin)
    vol = load_volume(tmp_path)
    assert vol.shape == (12, 10, 6) and np.array_equal(vol.hu, hu)
    assert vol.spacing == pytest.approx((0.8, 0.9, 2.0))
    # voxel (i, j, k) sits at LPS origin + (0.8 i, 0.9 j, 2 k); RAS flips x and y
    ras = vol.affine @ np.array([3, 4, 5, 1.0])
    assert ras[:3] == pytest.approx([-(origin[0] + 2.4), -(origin[1] + 3.6), origin[2] + 10.0])


def test_nifti_with_label_names_from_extension_or_fallback(tmp_path: Path) -> None:
    seg = SHARED_CT / "abdomen_pelvis_ct_small_seg.nii.gz"
    if seg.is_file():
        vol = load_volume(SHARED_CT / "abdomen_pelvis_ct_small.nii.gz", labels=seg)
        assert vol.label_names[31] == "vertebrae_L1" == TOTALSEG_V1_NAMES[31]
        assert vol.labels is not None and vol.labels.shape == vol.shape
    hu = np.zeros((8, 8, 4), dtype=np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), dtype=np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz", labels=tmp_path / "seg.nii.gz")
    assert vol.label_names == {} and vol.name == "ct"  # synth falls back to TOTALSEG_V1_NAMES


def test_raw_array_with_spacing_and_offset(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.full((4, 5, 6), 1024, dtype=np.int16))
    vol = load_volume(tmp_path / "v.npy", spacing=(3.2, 3.2, 1.5), hu_offset=-1024)
    assert vol.spacing == pytest.approx((3.2, 3.2, 1.5)) and float(vol.hu.max()) == 0.0


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.nii.gz", "no such file"),
    (lambda d: (d / "x.txt").write_text("x") and d / "x.txt", "unsupported volume format"),
    (lambda d: d, "CT slices"),
])
def test_bad_inputs_name_the_file_and_fix(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(VolumeError, match=match):
        load_volume(make(tmp_path))


def test_label_map_of_another_grid_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), dtype=np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 5), dtype=np.uint8), np.eye(4)), tmp_path / "seg.nii.gz")
    with pytest.raises(VolumeError, match="shape"):
        load_volume(tmp_path / "ct.nii.gz", labels=tmp_path / "seg.nii.gz")
