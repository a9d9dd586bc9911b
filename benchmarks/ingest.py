"""Benchmark the lake: ingest, decode and loader throughput per core, and peak memory vs file count.

    .venv/bin/python benchmarks/ingest.py            # 500 radiographs; RSS at 500 and 5,000 files
    .venv/bin/python benchmarks/ingest.py --quick    # 100 radiographs; RSS at 100 and 1,000 files

Inputs are generated from pydicom-data's real CR radiographs (RG1_UNCR: PA chest 1955x1841
15-bit; RG3_UNCR: ankle 1760x1760 10-bit), one pixel row perturbed per copy so every file has a
distinct pixel hash, written as uncompressed DICOM to a temporary folder. "naive" is pydicom ->
float -> OpenCV area resize -> 16-bit PNG, interleaved with ingest in the same run. Rates are per
CPU-second of one process (= per core; robust to other load on a shared machine), wall-clock
rates alongside. Peak RSS is VmHWM of a child process that ingests 1/4-size copies. Prints and
writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from xrayfm.config import atomic_write_text, versions
from xrayfm.lake import decode_image, read_rows
from xrayfm.lake.ingest import IngestConfig, ingest, single_core_process
from xrayfm.privacy import load_or_create_key

OUT = Path(__file__).resolve().parent / "results" / "ingest.json"


def make_files(out: Path, n: int, subsample: int = 1) -> list[Path]:
    """``n`` distinct uncompressed radiograph DICOMs (RG1/RG3 alternating, pixels perturbed)."""
    out.mkdir(parents=True, exist_ok=True)
    bases = []
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        arr = np.ascontiguousarray(ds.pixel_array[::subsample, ::subsample])
        ds.Rows, ds.Columns = arr.shape
        bases.append((ds, arr))
    paths = []
    for i in range(n):
        ds, base = bases[i % 2]
        arr = base.copy()
        arr[0, :24] ^= (((i // 2) >> np.arange(24)) & 1).astype(arr.dtype)  # the copy number in the low bits of row 0
        ds.PixelData = arr.tobytes()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.7.{i + 1}"
        p = out / f"img{i:05d}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths


def naive(paths: list[Path], pngs: list[bytes], max_side: int = 512) -> None:
    """The naive path: pydicom -> float -> area resize -> 16-bit PNG (keeps a sample of PNGs)."""
    for p in paths:
        a = pydicom.dcmread(p).pixel_array.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1.0)
        h, w = a.shape
        s = max_side / max(h, w)
        r = cv2.resize(a, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        png = cv2.imencode(".png", np.round(r * 65535).astype(np.uint16))[1].tobytes()
        if len(pngs) < 100:
            pngs.append(png)


def decode_rate(blobs: list[bytes], fn, repeat: int = 3) -> float:
    """Images per CPU-second of this process (robust to other load on a shared machine)."""
    t = time.process_time()
    for _ in range(repeat):
        for b in blobs:
            fn(b)
    return repeat * len(blobs) / (time.process_time() - t)


def codec_table(images: list[np.ndarray]) -> list[dict]:
    """Size and decode speed of candidate lossless encodings on the same stored 512-px images."""
    import zstandard

    from xrayfm.lake.codec import encode_image

    def png(level: int):
        return (lambda a: cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, level])[1].tobytes(),
                lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED))

    def zstd_plain(level: int):
        c, d = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        return lambda a: c.compress(a.tobytes()), lambda b: np.frombuffer(d.decompress(b), np.uint16)

    def lake(codec: str):
        return lambda a: encode_image(a, codec), decode_image

    candidates = {"png16 level 1": png(1), "png16 level 3": png(3), "zstd-1 raw (lake 'zstd')": lake("zstd"),
                  "zstd-3 raw": zstd_plain(3), "zstd-1 vdelta+byteplanes (lake default)": lake("zstd-vdelta")}
    rows = []
    for name, (enc, dec) in candidates.items():
        blobs = [enc(a) for a in images]
        rows.append({"codec": name, "kib_per_image": round(float(np.mean([len(b) for b in blobs])) / 1024, 1),
                     "raw_kib_per_image": round(float(np.mean([a.nbytes for a in images])) / 1024, 1),
                     "decode_images_per_cpu_s": round(decode_rate(blobs, dec), 1)})
    return rows


def rss_run(src: str, lake: str, key: str) -> None:
    """Child process: ingest and print its peak RSS in MiB.

    VmHWM, not ru_maxrss: the latter keeps the forking parent's resident size across exec.
    """
    single_core_process()  # as `xrayfm ingest` does
    s = ingest([src], lake, IngestConfig(key_file=key))
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"ingested": s.ingested, "seconds": s.seconds,
                      "images_per_wall_s": round(s.ingested / s.seconds, 1),
                      "peak_rss_mib": round(int(hwm.split()[1]) / 1024, 1)}))


def peak_rss(tmp: Path, n: int, key: str) -> dict:
    src = tmp / f"rss{n}"
    make_files(src, n, subsample=4)
    out = subprocess.run([sys.executable, __file__, "--rss-run", str(src), str(tmp / f"rsslake{n}"), key],
                         check=True, capture_output=True, text=True).stdout
    return {"files": n, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 radiographs, RSS at 100 and 1,000 files")
    ap.add_argument("--rss-run", nargs=3, metavar=("SRC", "LAKE", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_run:
        rss_run(*args.rss_run)
        return
    n, rss_counts = (100, (100, 1000)) if args.quick else (500, (500, 5000))
    single_core_process()  # as `xrayfm ingest` does; applies to the naive path too
    with tempfile.TemporaryDirectory(prefix="xrayfm-bench-") as d:
        tmp = Path(d)
        key = str(tmp / "bench.key")
        load_or_create_key(key)
        paths = make_files(tmp / "src", n)
        lake, pngs = str(tmp / "lake"), []
        cfg = IngestConfig(key_file=key, workers=1, max_side=512)
        cpu = {"naive": 0.0, "ingest": 0.0}
        wall = {"naive": 0.0, "ingest": 0.0}
        ingested = 0
        for k in range(5):  # interleaved chunks, so both paths see the same machine load
            chunk = paths[k * n // 5:(k + 1) * n // 5]
            c, w = time.process_time(), time.perf_counter()
            naive(chunk, pngs)
            cpu["naive"] += time.process_time() - c
            wall["naive"] += time.perf_counter() - w
            c, w = time.process_time(), time.perf_counter()
            ingested += ingest([str(p) for p in chunk], lake, cfg).ingested
            cpu["ingest"] += time.process_time() - c
            wall["ingest"] += time.perf_counter() - w
        blobs = read_rows(lake, columns=["image"]).column("image").to_pylist()[:100]
        png_decode = decode_rate(pngs, lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED))
        lake_decode = decode_rate(blobs, decode_image)
        codecs = codec_table([decode_image(b) for b in blobs[:40]])
        from xrayfm.lake import LakeDataset  # torch: imported here so the RSS child never loads it

        t = time.process_time()
        seen = sum(1 for _ in LakeDataset(lake, shuffle=True, rank=0, world_size=1))
        loader_rate = seen / (time.process_time() - t)
        result = {
            "files": n,
            "input": "RG1_UNCR/RG3_UNCR perturbed copies, uncompressed, max side 512",
            "ingested": ingested,
            "ingest_images_per_cpu_s": round(ingested / cpu["ingest"], 1),
            "naive_images_per_cpu_s": round(n / cpu["naive"], 1),
            "ingest_images_per_wall_s": round(ingested / wall["ingest"], 1),
            "naive_images_per_wall_s": round(n / wall["naive"], 1),
            "lake_decode_images_per_cpu_s": round(lake_decode, 1),
            "png16_decode_images_per_cpu_s": round(png_decode, 1),
            "lake_kib_per_image": round(float(np.mean([len(b) for b in blobs])) / 1024, 1),
            "png16_kib_per_image": round(float(np.mean([len(b) for b in pngs])) / 1024, 1),
            "loader_images_per_cpu_s": round(loader_rate, 1),
            "codecs": codecs,
            "peak_rss": [peak_rss(tmp, k, key) for k in rss_counts],
            "versions": versions(),
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=2))


if __name__ == "__main__":
    main()
