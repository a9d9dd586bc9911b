"""Benchmark synthetic C-arm rendering: images/s at 128^2 and 256^2 after the CT is loaded.

    .venv/bin/python benchmarks/synth.py            # demo CT if fetched, else the phantom
    .venv/bin/python benchmarks/synth.py --n 8      # fewer images per setting

Per setting it renders ``n`` full images of the synth pipeline (random view with truncation
hiding, tissue projector, 4 pedicle screws + rods with 2x2 sub-pixel rays, exposure, labels,
uint16 + pixel hash; no DICOM writing) in one process with torch/OpenCV threads at 1 and at the
machine's default, and times the two projectors alone (Joseph warp vs torch grid_sample) on one
view. Rates per wall-second and per CPU-second of the process (robust to other load on a shared
machine). Writes benchmarks/results/synth.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import cv2
import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.synth.generate import SynthConfig, build_scene, load_ct, prepare_base, render_image
from xrayfm.synth.geometry import View
from xrayfm.synth.render import line_integrals

OUT = Path(__file__).resolve().parent / "results" / "synth.json"


def _base(cfg: SynthConfig):
    from xrayfm.synth.demo_data import DemoDataError

    try:
        return prepare_base(cfg, load_ct(cfg)), "demo LIDC-IDRI-0001"
    except DemoDataError:
        import tempfile

        import nibabel as nib

        from xrayfm.synth.phantom import make_phantom

        vol = make_phantom(voxel_mm=1.0)
        d = Path(tempfile.mkdtemp())
        nib.save(nib.Nifti1Image(vol.hu, vol.affine), d / "ct.nii.gz")
        nib.save(nib.Nifti1Image(vol.labels, vol.affine), d / "seg.nii.gz")
        cfg.ct, cfg.labels = str(d / "ct.nii.gz"), str(d / "seg.nii.gz")
        return prepare_base(cfg, load_ct(cfg)), "phantom (demo CT not fetched)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn, n: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - w0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="images per setting")
    ap.add_argument("--voxel-mm", type=float, default=1.0)
    args = ap.parse_args()
    results: dict = {"device": _cpu_name(), "cpu_count": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "voxel_mm": args.voxel_mm, "n": args.n, "versions": versions(), "settings": []}
    t0 = time.perf_counter()
    cfg = SynthConfig(out="/tmp/xrayfm-bench-synth", screws=(4, 4), voxel_mm=args.voxel_mm,
                      images_per_study=args.n)
    base, source = _base(cfg)
    results["source"], results["load_s"] = source, round(time.perf_counter() - t0, 2)
    default_threads = torch.get_num_threads()
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for size in (128, 256):
            cfg.size = size
            scene = build_scene(base, cfg, 0)
            render_image(base, cfg, 0, scene)  # warm-up
            wall, cpu = _time(lambda i, sc=scene: render_image(base, cfg, i, sc), args.n)
            view = View(tuple(0.5 * (scene.volume.body_lo + scene.volume.body_hi)), 30.0, 10.0, size=size)
            warp, _ = _time(lambda i, v=view, sc=scene: line_integrals(sc.volume, v, "warp"), 4)
            grid, _ = _time(lambda i, v=view, sc=scene: line_integrals(sc.volume, v, "grid"), 1)
            row = {"size": size, "threads": threads, "pipeline_img_per_s_wall": round(wall, 2),
                   "pipeline_img_per_cpu_s": round(cpu, 2), "projector_warp_img_per_s": round(warp, 2),
                   "projector_grid_sample_img_per_s": round(grid, 2)}
            print(json.dumps(row))
            results["settings"].append(row)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(results, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
