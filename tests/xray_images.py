"""Real radiographs from pydicom-data (and the team's PNGs) as files, arrays and tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from io_testdata import SHARED_XRAY


def pydicom_data_file(name: str) -> Path:
    """Path of a pydicom-data file; skip the test when pydicom-data or the file is unavailable."""
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is needed for real DICOM files")
    path = data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} unavailable")
    return Path(path)


def unit_pixels(name: str, as_displayed: bool) -> np.ndarray:
    """A pydicom-data file's pixels as float32 scaled to [0, 1]; ``as_displayed`` inverts MONOCHROME1."""
    pydicom = pytest.importorskip("pydicom")
    data = pytest.importorskip("pydicom.data")
    ds = pydicom.dcmread(data.get_testdata_file(name))
    arr = ds.pixel_array.astype(np.float32)
    arr = (arr - arr.min()) / (arr.max() - arr.min())
    if as_displayed and ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 1.0 - arr
    return arr


def real_xrays(n: int, size: int = 64) -> list[dict[str, torch.Tensor]]:
    """``n`` items {"image": (1, size, size) in [0, 1]} cut from real radiographs.

    pydicom-data's chest (RG1, MONOCHROME1) and ankle (RG3), plus the team's PNGs when present;
    each source image gives several different square tiles so ``n`` can exceed the file count.
    """
    cv2 = pytest.importorskip("cv2")
    sources = [unit_pixels(name, as_displayed=True) for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm")]
    for png in sorted(SHARED_XRAY.glob("*.png")) if SHARED_XRAY.is_dir() else []:
        sources.append(cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0)
    items = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape
        side = min(h, w) * (1.0 - 0.1 * (i // len(sources) % 4))
        top, left = int((h - side) * 0.5), int((w - side) * ((i // len(sources)) % 3) / 2)
        tile = img[top:top + int(side), left:left + int(side)]
        tile = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
        items.append({"image": torch.from_numpy(np.clip(tile, 0, 1))[None]})
    return items
