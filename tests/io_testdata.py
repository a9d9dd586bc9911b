"""Locate real test files for the io tests without touching the network.

``pydicom.data.get_testdata_file`` falls back to downloading from GitHub when a file is not
installed, and ``get_testdata_files`` always tries to; these helpers only look at what is on disk
(pydicom's own test files and the ``pydicom-data`` package) and skip when a file is absent.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

SHARED_XRAY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray"


def pydicom_test_dirs() -> list[Path]:
    """Folders holding pydicom's test files and, when installed, pydicom-data's."""
    dirs = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return [d for d in dirs if d.is_dir()]


def pydicom_file(name: str) -> Path:
    """Path of a pydicom / pydicom-data test file, or skip the test when it is not installed."""
    for d in pydicom_test_dirs():
        if (d / name).is_file():
            return d / name
    pytest.skip(f"{name} not installed: pip install pydicom-data (the dev extra) to run this test")


def shared_xray(name: str) -> Path:
    """Path of a team-shared X-ray file, or skip when ../shared is absent."""
    p = SHARED_XRAY / name
    if not p.is_file():
        pytest.skip(f"{p} absent: the team's shared data folder is not next to this checkout")
    return p
