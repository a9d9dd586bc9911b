"""Benchmark predict and serve: per-image latency, one joint backbone pass vs one pass per head,
and the service's requests/s and p50/p95 latency for single (sequential) requests and for
concurrent requests with and without batching.

    .venv/bin/python benchmarks/serve.py                 # vit_tiny_patch16 at 224 px, 16 requests
    .venv/bin/python benchmarks/serve.py --arch resnet18 --size 224 --requests 32
    .venv/bin/python benchmarks/serve.py --model /tmp/dd/bundle --dicom /tmp/dd/samples/x.dcm

The bundle is a random-init backbone exported with ``export_backbone`` plus untrained heads saved
with ``save_head_bundle`` (timing does not depend on the weights). Input: the real 1024x1024 CR
DICOM from ../shared/data when present, else pydicom-data's RG1_UNCR (1955x1841). Times are
CPU-seconds of this process (``time.process_time``; torch limited to ``--threads``), which stay
meaningful on a machine shared with other jobs; wall-clock seconds alongside. Requests go through
httpx's ASGI transport in this process (no sockets): ``serve_single`` posts ``--single`` requests
one after another (window 0, max batch 1), ``serve_concurrent_batched`` / ``_unbatched`` post
``--requests`` at once (window 20 ms, max 8 / window 0, max 1); requests/s and latency
percentiles are wall-clock, per request from send to answer. ``--precision bf16`` loads the
bundle with bf16 autocast (``ModelBundle.load``). Prints and writes benchmarks/results/serve.json
(or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.io import read_any
from xrayfm.models.backbones import create_backbone
from xrayfm.models.bundle import ModelBundle, joint_features
from xrayfm.models.card import export_backbone, load_backbone
from xrayfm.models.heads import create_head
from xrayfm.models.runtime import autocast
from xrayfm.report.overlay import draw_overlay, png_bytes
from xrayfm.serve.app import create_app
from xrayfm.serve.results import frame_spacing, result_json
from xrayfm.tasks.base import get_task
from xrayfm.tasks.train import HeadTrainConfig, head_arguments, save_head_bundle

OUT = Path(__file__).resolve().parent / "results" / "serve.json"
SHARED_DICOM = (
    Path(__file__).resolve().parents[1].parent / "shared/data/xray/chest_cr_siim_sternotomy_wires.dcm"
)


def build_bundle(root: Path, arch: str, size: int) -> Path:
    export_backbone(create_backbone(arch, img_size=size), root / "bb", size)
    bb, card = load_backbone(str(root / "bb"))
    heads = []
    for name in ("classify", "segment", "detect"):
        task = get_task(name)
        cfg = HeadTrainConfig(task=name, img_size=size)
        cfg.pool = bb.resolve_pool(cfg.pool)  # as train_head does
        kw = head_arguments(task, cfg)
        head = create_head(task.default_head, bb.embed_dim, bb.dense_channels, bb.dense_strides, **kw)
        heads.append(save_head_bundle(root / name, head, cfg, bb, card, [], kw))
    return ModelBundle.create(root / "bb", heads, root / "bundle")


def timed(fn, reps: int, per: int = 1) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Mean CPU and wall seconds per call of ``fn`` (divided by ``per`` items per call)."""
    fn()  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(reps):
        fn()
    n = reps * per
    return {
        "cpu_s": round((time.process_time() - c0) / n, 4),
        "wall_s": round((time.perf_counter() - t0) / n, 4),
    }


def latency_stats(latencies: list[float], wall: float, cpu: float) -> dict[str, float]:
    """Requests/s (wall and per CPU s) and p50/p95 latency in ms of ``len(latencies)`` requests."""
    lat = np.asarray(latencies) * 1000.0
    n = len(latencies)
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "requests_per_s": round(n / wall, 2),
        "requests_per_cpu_s": round(n / cpu, 2),
        "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
        "latency_p95_ms": round(float(np.percentile(lat, 95)), 1),
    }


async def fire(app: object, data: bytes, n: int, concurrent: bool = True) -> dict[str, float]:
    """POST ``data`` ``n`` times, all at once or one after the other; throughput and latency."""
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600) as c:

        async def one() -> float:
            t = time.perf_counter()
            q = await c.post("/v1/predict", files={"file": ("x.dcm", data)})
            assert q.status_code == 200, q.text
            return time.perf_counter() - t

        c0, t0 = time.process_time(), time.perf_counter()
        if concurrent:
            lat = list(await asyncio.gather(*(one() for _ in range(n))))
        else:
            lat = [await one() for _ in range(n)]
        return latency_stats(lat, time.perf_counter() - t0, time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_tiny_patch16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests per mode")
    ap.add_argument("--single", type=int, default=10, help="sequential single-image requests")
    ap.add_argument("--model", type=Path, help="an existing bundle instead of a random-init one")
    ap.add_argument("--dicom", type=Path, help="the file to POST (default: the 1024x1024 CR DICOM)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="the bundle's forward pass (ModelBundle.load precision)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dicom = args.dicom or SHARED_DICOM
    if not dicom.is_file():
        from pydicom.data import get_testdata_file

        dicom = Path(get_testdata_file("RG1_UNCR.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = ModelBundle.load(args.model or build_bundle(Path(tmp), args.arch, args.size),
                                  precision=args.precision)
        args.arch, args.size = bundle.card()["arch"], bundle.card()["input_size"]
        frame = next(iter(read_any(dicom)))
        img, spacing = frame.image, frame_spacing(frame)
        res: dict[str, object] = {
            "command": " ".join(["benchmarks/serve.py", *sys.argv[1:]]),
            "bundle": str(args.model) if args.model else "random-init",
            "arch": args.arch,
            "input_size": args.size,
            "input": dicom.name,
            "input_shape": list(img.shape),
            "torch_threads": torch.get_num_threads(),
            "precision": bundle.precision,
        }
        res["decode_s"] = timed(lambda: next(iter(read_any(dicom))), args.reps)
        res["predict_1_image_s"] = timed(lambda: bundle.predict([img], [spacing]), args.reps)
        res["predict_8_images_s_per_image"] = timed(lambda: bundle.predict([img] * 8, [spacing] * 8), 2, 8)
        r = bundle.predict([img], [spacing])[0]
        res["json_s"] = timed(lambda: json.dumps(result_json(r, frame)), args.reps)
        res["overlay_png_s"] = timed(lambda: png_bytes(draw_overlay(img, r)), args.reps)
        x = torch.rand(8, 1, args.size, args.size)
        amp = torch.bfloat16 if bundle.precision == "bf16" else None
        with torch.no_grad(), autocast(x.device, amp):
            res["backbone_joint_pass_s_per_image"] = timed(lambda: joint_features(bundle.backbone, x), 2, 8)
            res["backbone_pass_per_head_s_per_image"] = timed(
                lambda: (
                    bundle.backbone(x),
                    bundle.backbone.forward_dense(x),
                    bundle.backbone.forward_dense(x),
                ),
                2,
                8,
            )
        data = dicom.read_bytes()
        app = create_app(bundle, batch_window_ms=0.0, max_batch=1, max_upload_mb=64)
        asyncio.run(fire(app, data, 2, concurrent=False))  # warm-up
        res["serve_single"] = asyncio.run(fire(app, data, args.single, concurrent=False))
        for label, window, max_batch in (("batched", 20.0, 8), ("unbatched", 0.0, 1)):
            app = create_app(bundle, batch_window_ms=window, max_batch=max_batch, max_upload_mb=64)
            asyncio.run(fire(app, data, 2))  # warm-up
            before = app.state.batcher.batches
            stats = asyncio.run(fire(app, data, args.requests))
            stats["backbone_passes"] = app.state.batcher.batches - before
            res[f"serve_concurrent_{label}"] = stats
    res["versions"] = versions()
    atomic_write_text(args.out, json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
