"""Per-core decode throughput of ``xrayfm.io.read_dicom_frames`` on real radiographs.

    .venv/bin/python benchmarks/io_decode.py [--repeat 20] [--retain-freed-memory]

For each file (pydicom-data CR radiographs, uncompressed and JPEG 2000 lossless, plus the shared
JPEG-baseline chest CR when present) it times, single-threaded:

* ``pydicom``: ``dcmread`` + ``pixel_array`` only (the floor: file read and codec);
* ``xrayfm``: ``read_dicom_frames`` (read, codec, pixel hash, intensity map to float32 [0, 1]);
* ``xrayfm+resize``: the same plus an OpenCV area resize to 512 px on the long side (the lake's
  ingest work before encoding);
* ``naive+resize``: ``pixel_array`` -> float64 -> divide by the bit range -> area resize, as a
  first script would do it.

With ``--retain-freed-memory`` the process first calls :func:`xrayfm.io.retain_freed_memory`
(glibc keeps freed heap instead of returning it to the kernel), as an ingest worker should.
Median and 25th-percentile milliseconds per image over ``--repeat`` runs (the low quartile is
less sensitive to other jobs on a shared machine); writes benchmarks/results/io_decode[_retain].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom

from xrayfm.config import atomic_write_text, versions
from xrayfm.io import read_dicom_frames, retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]
SHARED_CR = ROOT.parent / "shared" / "data" / "xray" / "chest_cr_siim_sternotomy_wires.dcm"


def _files() -> list[Path]:
    import data_store  # pydicom-data

    data = Path(data_store.__file__).parent / "data"
    files = [data / n for n in ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KR.dcm")]
    return files + ([SHARED_CR] if SHARED_CR.is_file() else [])


def _resize(img: np.ndarray, side: int = 512) -> np.ndarray:
    h, w = img.shape
    s = side / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _times(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, 25th percentile) seconds; the machine is shared, the low quartile is less noisy."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[len(times) // 4]


def _cases(path: Path, top: float) -> dict[str, Callable[[], object]]:
    def naive() -> np.ndarray:
        return _resize(pydicom.dcmread(path).pixel_array.astype(np.float64) / top)

    return {
        "pydicom": lambda: pydicom.dcmread(path).pixel_array,
        "xrayfm": lambda: list(read_dicom_frames(path)),
        "xrayfm+resize": lambda: [_resize(f.image) for f in read_dicom_frames(path)],
        "naive+resize": naive,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--retain-freed-memory", action="store_true")
    args = ap.parse_args()
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit("--retain-freed-memory: mallopt is not available (not glibc)")
    cv2.setNumThreads(1)
    results = []
    for path in _files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        cases = _cases(path, float(2**ds.BitsStored - 1))
        row = {"file": path.name, "shape": [int(ds.Rows), int(ds.Columns)], "bits_stored": int(ds.BitsStored),
               "transfer_syntax": ds.file_meta.TransferSyntaxUID.name}
        repeat = args.repeat if "J2K" not in path.name else max(3, args.repeat // 5)
        for name, fn in cases.items():
            med, p25 = _times(fn, repeat)
            row[f"{name}_ms_median"] = round(med * 1e3, 2)
            row[f"{name}_ms_p25"] = round(p25 * 1e3, 2)
            row[f"{name}_per_s_p25"] = round(1.0 / p25, 1)
        results.append(row)
        print(json.dumps(row))
    out = {"results": results, "load_avg_1min": os.getloadavg()[0], "versions": versions(),
           "retain_freed_memory": args.retain_freed_memory,
           "threads": "cv2 1 thread; numpy elementwise single-threaded"}
    name = "io_decode_retain.json" if args.retain_freed_memory else "io_decode.json"
    atomic_write_text(ROOT / "benchmarks" / "results" / name, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
