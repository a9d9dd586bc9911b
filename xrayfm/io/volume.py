"""CT volumes: NIfTI (nibabel), DICOM series (pydicom) or raw ``.npy``/``.npz`` -> :class:`CTVolume`.

A volume is an array ``hu[i, j, k]`` in Hounsfield units with a 4x4 ``affine`` mapping voxel
indices to world millimetres in nibabel's RAS+ frame (+x towards the patient's Right, +y Anterior,
+z Superior); DICOM series (LPS) are converted to RAS. An optional integer label map of the same shape and a
``{label_id: structure_name}`` table travel with it.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A volume that cannot be read or used; the message names the file and the fix."""


@dataclass
class CTVolume:
    """A CT volume in HU with its voxel->world (RAS mm) affine and optional labels."""

    hu: np.ndarray                       # float32 (I, J, K)
    affine: np.ndarray                   # float64 (4, 4), voxel index -> RAS mm
    name: str
    labels: np.ndarray | None = None     # integer (I, J, K), 0 = background
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _caret_label_names(img: object) -> dict[int, str]:
    """Label names from a Caret/GIFTI-style XML label table in a NIfTI header extension."""
    names: dict[int, str] = {}
    for ext in img.header.extensions:
        content = ext.get_content() if hasattr(ext, "get_content") else ext._content
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        for key, name in re.findall(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]+)\]\]>', text):
            names[int(key)] = name
    return names


def _csv_label_names(path: Path) -> dict[int, str]:
    """Label names from a ``structures.csv`` (columns ``structure`` and ``id``) beside a mask."""
    with path.open(newline="") as f:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(f)}


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for a broken file
        raise VolumeError(f"{path}: not a readable NIfTI file ({exc}); pass a .nii/.nii.gz volume") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64), img


def _load_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one axial CT series from a folder; returns (HU array (I=col, J=row, K=slice), RAS affine)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError):  # not DICOM: a series folder may hold other files
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if len(slices) < 2:
        raise VolumeError(f"{folder}: found {len(slices)} CT slices with position/orientation; "
                          "pass a folder holding one DICOM CT series")
    series = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise VolumeError(f"{folder}: holds {len(series)} series; pass a folder with exactly one")
    iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=np.float64))))
    pos = np.array([s.ImagePositionPatient for s in slices], dtype=np.float64)
    dz = float(np.median(np.diff(pos @ normal)))
    if dz <= 0:
        raise VolumeError(f"{folder}: slices share one position; pass a volumetric series")
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # row spacing, column spacing
    vol = np.stack([s.pixel_array.astype(np.float32) * float(s.get("RescaleSlope", 1))
                    + float(s.get("RescaleIntercept", 0)) for s in slices], axis=-1)
    vol = np.transpose(vol, (1, 0, 2))  # (rows, cols, slices) -> (cols, rows, slices)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = normal * dz
    lps[:3, 3] = pos[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return vol, ras


def _load_array(path: Path, spacing: tuple[float, float, float], hu_offset: float) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as z:
            if not z.files:
                raise VolumeError(f"{path}: empty .npz; pass an archive holding one 3-D array")
            data = z[z.files[0]]
    else:
        data = np.load(path)
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3-D array, got shape {data.shape}")
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    return data.astype(np.float32) + np.float32(hu_offset), affine


def load_volume(path: str | Path, labels: str | Path | None = None, name: str | None = None,
                spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), hu_offset: float = 0.0) -> CTVolume:
    """Load a CT volume (NIfTI file, DICOM series folder, or raw .npy/.npz) and an optional label map.

    ``spacing`` (mm) and ``hu_offset`` (added to raw values to get HU) apply to raw arrays only.
    Label names come from a Caret XML extension in the label NIfTI, else from ``structures.csv``
    beside the label file.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder; pass a NIfTI file, a DICOM series folder or .npy/.npz")
    if p.is_dir():
        hu, affine = _load_dicom_series(p)
    elif _is_nifti(p):
        data, affine, _ = _load_nifti(p)
        hu = data.astype(np.float32)
    elif p.suffix in (".npy", ".npz"):
        hu, affine = _load_array(p, spacing, hu_offset)
    else:
        raise VolumeError(f"{p}: unsupported volume format; pass .nii/.nii.gz, .npy/.npz or a DICOM folder")
    vol = CTVolume(hu=np.ascontiguousarray(hu, dtype=np.float32), affine=affine,
                   name=name or p.name.split(".")[0])
    if labels is not None:
        lp = Path(labels)
        if not lp.is_file() or not _is_nifti(lp):
            raise VolumeError(f"{lp}: label map must be an existing .nii/.nii.gz file")
        lab, lab_affine, img = _load_nifti(lp)
        if lab.shape != vol.hu.shape:
            raise VolumeError(f"{lp}: label map shape {lab.shape} differs from volume shape {vol.hu.shape}; "
                              "pass the label map made for this volume")
        if not np.allclose(lab_affine, affine, atol=1e-2):
            raise VolumeError(f"{lp}: label map affine differs from the volume's; resample it onto the CT grid")
        vol.labels = np.ascontiguousarray(lab, dtype=np.int16)
        vol.label_names = _caret_label_names(img)
        csv_path = lp.parent / "structures.csv"
        if not vol.label_names and csv_path.is_file():
            vol.label_names = _csv_label_names(csv_path)
    return vol
