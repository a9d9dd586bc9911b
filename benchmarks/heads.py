"""Heads on synthetic C-arm data: metrics per task and the cost of the feature cache vs the backbone loop.

Pipeline: a synth run (demo CT by default; ``--synth`` reuses one) -> ingest into a temporary lake
(split 60/10/30 by patient) -> for each backbone (random init unless ``--backbone`` bundles are
given) train the classification, segmentation and detection heads on the feature cache, evaluate
them on the test split (``xrayfm.tasks.evaluate.evaluate_heads``, kNN included), and time

* feature extraction (images/s, pooled and dense),
* one head epoch on the cache vs one epoch running the frozen backbone every step (the price of
  geometric augmentation).

The machine is shared: the 1-minute load average is recorded next to the numbers.

    .venv/bin/python benchmarks/heads.py [--n 120] [--size 128] [--epochs 30] [--threads 1]
        [--archs resnet18,vit_tiny_patch16] [--backbone BUNDLE ...] [--synth RUN]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.lake.ingest import IngestConfig, ingest
from xrayfm.models import create_backbone, export_backbone, load_backbone
from xrayfm.privacy import load_or_create_key
from xrayfm.synth.generate import SynthConfig, generate
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import images_tensor, load_labeled_images, resize_item
from xrayfm.tasks.evaluate import evaluate_heads
from xrayfm.tasks.features import batched, compute_features
from xrayfm.tasks.train import HeadTrainConfig, head_arguments, save_head_bundle, train_head

RESULTS = Path(__file__).resolve().parent / "results" / "heads.json"


def _time_epoch(backbone: torch.nn.Module, items: list, size: int, in_loop: bool) -> float:
    """Seconds for one segmentation-head epoch (batch 16) on the cache or through the backbone."""
    cfg = HeadTrainConfig(task="segment", img_size=size, epochs=1, batch_size=16, augment=in_loop)
    t = time.perf_counter()
    train_head(backbone, items, cfg)
    total = time.perf_counter() - t
    if not in_loop:  # subtract the one-off feature pass, measured separately
        resized = [resize_item(it, size) for it in items]
        t = time.perf_counter()
        compute_features(backbone, batched([it.image_id for it in resized], images_tensor(resized), 16), "dense")
        total -= time.perf_counter() - t
    return total


def _features_rate(backbone: torch.nn.Module, items: list, size: int, kind: str) -> float:
    resized = [resize_item(it, size) for it in items]
    t = time.perf_counter()
    compute_features(backbone, batched([it.image_id for it in resized], images_tensor(resized), 16), kind)
    return len(items) / (time.perf_counter() - t)


def run_backbone(bundle: Path, lake: str, labels: str, size: int, epochs: int, work: Path) -> dict[str, Any]:
    backbone, card = load_backbone(str(bundle))
    train, _ = load_labeled_images(lake, labels, "train")
    test, _ = load_labeled_images(lake, labels, "test")
    out: dict[str, Any] = {"arch": card["arch"], "method": card.get("method"), "n_train": len(train),
                           "n_test": len(test)}
    out["features_per_s"] = {k: round(_features_rate(backbone, train, size, k), 1) for k in ("pooled", "dense")}
    out["segment_epoch_s"] = {"cache": round(_time_epoch(backbone, train, size, False), 2),
                              "backbone_in_loop": round(_time_epoch(backbone, train, size, True), 2)}
    heads, train_s = [], {}
    for task_name, lr in (("classify", 1e-2), ("segment", 1e-2), ("detect", 1e-2)):
        cfg = HeadTrainConfig(task=task_name, img_size=size, epochs=epochs, batch_size=16, lr=lr)
        t = time.perf_counter()
        head, history = train_head(backbone, train, cfg)
        train_s[task_name] = round(time.perf_counter() - t, 1)
        path = work / f"{card['arch']}_{task_name}"
        save_head_bundle(path, head, cfg, backbone, card, history, head_arguments(get_task(task_name), cfg))
        heads.append(path)
    doc = evaluate_heads(bundle, heads, test, train)
    out["train_s"] = train_s
    out["metrics"] = {k: doc[k] for k in ("classification", "segmentation", "detection")}
    out["metrics"]["classification"].pop("confusion_matrix")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="synthetic images to render")
    ap.add_argument("--size", type=int, default=128, help="image size (render, lake and heads)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", default="resnet18,vit_tiny_patch16", help="random-init backbones")
    ap.add_argument("--backbone", action="append", default=[], help="exported backbone bundle(s)")
    ap.add_argument("--synth", help="existing synth run folder to reuse")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="xrayfm-heads-bench-"))
    t0 = time.perf_counter()
    synth = Path(args.synth) if args.synth else work / "synth"  # removed with ``work`` at the end
    if not args.synth:
        generate(SynthConfig(out=str(synth), n=args.n, size=args.size, seed=7, voxel_mm=3.0, images_per_study=4))
    render_s = time.perf_counter() - t0
    n_images = len(list((synth / "dicom").rglob("*.dcm")))
    load_or_create_key(work / "k.key")
    lake = str(work / "lake")
    ingest([str(synth / "dicom")], lake, IngestConfig(key_file=str(work / "k.key"), max_side=args.size,
                                                     split_fractions=(0.6, 0.1, 0.3)))
    bundles = [Path(b) for b in args.backbone]
    for arch in filter(None, args.archs.split(",")):
        torch.manual_seed(0)
        export_backbone(create_backbone(arch, img_size=args.size), work / f"bb_{arch}", args.size,
                        extra={"method": "random_init"})
        bundles.append(work / f"bb_{arch}")
    try:
        results = [run_backbone(b, lake, str(synth / "labels.parquet"), args.size, args.epochs, work)
                   for b in bundles]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"setup": {"n": n_images, "size": args.size, "epochs": args.epochs, "threads": args.threads,
                     "synth": str(synth), "render_s": round(render_s, 1)},
           "load_avg_1min": os.getloadavg()[0], "versions": versions(), "results": results}
    atomic_write_text(args.out, json.dumps(doc, indent=2, default=str))
    print(json.dumps(results, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
