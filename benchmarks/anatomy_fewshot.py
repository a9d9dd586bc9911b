"""Few-shot segmentation (metal or vertebrae) and part-whole similarity: anatomy vs DINO vs random init.

1. Synthesises C-arm images with pedicle screws from the demo CT (``xrayfm.synth.generate``,
   cached in ``--data``), reads them back through ``xrayfm.io`` and joins the ``--target`` masks
   (metal: ``mask_png``; vertebrae: ``vertebrae_png``) by pixel hash; the last fifth of the
   patients is the fixed test set.
2. Pretrains the same backbone with ``method: dino`` and ``method: anatomy`` on the other
   images for the same steps, batch and crop sizes (DINO: 2 global + 6 local crops; anatomy:
   2 global + 2 local crops + 4 parts at the local size, about the same FLOPs).
3. For random init, DINO and anatomy: frozen backbone, ``seg_decoder`` head (task ``segment`` or
   ``segment_vertebrae``) trained on 3, 6, 12, 24 labelled images (one subset per seed), mean
   Dice on the test images whose target mask is non-empty.
4. Part-whole cosine similarity (``xrayfm.ssl.anatomy.part_whole_similarity``) on the test images.

    .venv/bin/python benchmarks/anatomy_fewshot.py [--quick] [--seeds 3] [--arch resnet18] \
        [--target metal|vertebrae]

Writes ``benchmarks/results/anatomy_fewshot[_vertebrae][_quick].json`` (or ``--out``) and keeps
the two pretrain runs under ``--work`` (a finished run with the same config is reused; both
targets pretrain on the same pixels, so they share the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.io import read_any
from xrayfm.models import create_backbone, load_backbone
from xrayfm.ssl import PretrainConfig, train
from xrayfm.ssl.anatomy import part_whole_similarity
from xrayfm.ssl.anatomy_views import AnatomyConfig
from xrayfm.synth.generate import SynthConfig, generate
from xrayfm.synth.labels import read_labels
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.metrics import segmentation_metrics
from xrayfm.tasks.train import HeadTrainConfig, predict_items, train_head

SHOTS = (3, 6, 12, 24)
TASK = {"metal": "segment", "vertebrae": "segment_vertebrae"}
HEAD_WIDTH = 32
RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("XRAYFM_CACHE", Path.home() / ".cache" / "xrayfm"))


def synth_items(data: Path, n: int, size: int, per_study: int, target: str = "metal") -> list[LabeledImage]:
    """Generate (or reuse) ``n`` synthetic images; return them with metal and vertebra masks, in order."""
    cfg = SynthConfig(out=str(data), ct="demo", n=n, size=size, seed=0, screws=(2, 6), images_per_study=per_study)
    summary = generate(cfg)
    print(f"synth: {summary.n_written} rendered, {summary.n_skipped} reused, {summary.n_screws} screws, "
          f"{summary.seconds:.0f} s")
    labels = {lb.pixel_hash: lb for lb in read_labels(data / "labels.parquet")}
    items = []
    for path in sorted((data / "dicom").rglob("*.dcm")):
        frame = next(read_any(path))
        lb = labels[frame.raw_hash]
        if target == "vertebrae" and lb.vertebra_mask is None:
            raise RuntimeError(f"{data}: labels carry no vertebra masks (written before vertebrae_png "
                               "existed); delete the folder or pass another --data to re-render it")
        patient = int(path.parts[-3].split("_")[1])
        items.append(LabeledImage(frame.image, image_id=str(path.relative_to(data)), mask=lb.mask,
                                  bone_mask=lb.vertebra_mask, extra={"patient": patient}))
    if len(items) != n:
        raise RuntimeError(f"{data} holds {len(items)} images, expected {n}; delete it and re-run")
    return items


def pretrain_cfg(method: str, arch: str, epochs: int, seed: int, base_lr: float = 5e-3,
                 out_dim: int = 1024) -> PretrainConfig:
    """Same steps, batch and crop sizes for both methods."""
    common: dict[str, Any] = {
        "arch": arch, "method": method, "global_size": 64, "local_size": 32, "out_dim": out_dim,
        "hidden_dim": 512, "bottleneck_dim": 128, "batch_size": 16, "epochs": epochs, "base_lr": base_lr,
        "warmup_epochs": 1.0, "momentum_teacher": 0.99, "freeze_last_layer_epochs": 1.0,
        "drop_path_rate": 0.0, "num_workers": 0, "log_every": 5, "checkpoint_every": 1000, "seed": seed,
        "precision": "fp32"}
    if method == "anatomy":
        return PretrainConfig(n_local=2, anatomy=AnatomyConfig(mlp_hidden_dim=512), **common)
    return PretrainConfig(n_local=6, **common)


def fewshot(backbone: torch.nn.Module, pool: list[LabeledImage], test: list[LabeledImage], shots: int,
            seed: int, img_size: int, steps: int, task: str = "segment") -> float:
    """Mean test Dice of a ``task`` head trained on ``shots`` images drawn from ``pool`` with ``seed``."""
    rng = np.random.default_rng(seed)
    subset = [pool[i] for i in rng.choice(len(pool), size=shots, replace=False)]
    batch = 8
    epochs = max(1, math.ceil(steps / math.ceil(shots / batch)))
    cfg = HeadTrainConfig(task=task, img_size=img_size, epochs=epochs, batch_size=batch, lr=3e-3, seed=seed,
                          head_width=HEAD_WIDTH)
    head, _ = train_head(backbone, subset, cfg)
    seg = get_task(task)
    preds = predict_items(backbone, head, seg, test, img_size)
    trues = [seg.label_mask(it) for it in test]
    return float(segmentation_metrics(preds, trues, boundary_k=None)["dice_mean"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~3 min: fewer images, epochs, head steps, one seed")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--target", choices=tuple(TASK), default="metal", help="mask the few-shot heads segment")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--base-lr", type=float, default=5e-3, help="pretraining lr per 256 images")
    ap.add_argument("--out-dim", type=int, default=1024, help="DINO prototypes")
    # one intra-op thread: on a shared 2-core machine two threads spin-wait (5x slower steps here)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, help="synth cache (default CACHE/bench/anatomy_synth[_vertebrae])")
    ap.add_argument("--work", type=Path, default=CACHE / "bench" / "anatomy_runs")
    ap.add_argument("--out", type=Path,
                    help="JSON results (default benchmarks/results/anatomy_fewshot[_vertebrae][_quick].json)")
    args = ap.parse_args()
    target_tag = "" if args.target == "metal" else f"_{args.target}"
    args.out = args.out or RESULTS / f"anatomy_fewshot{target_tag}{'_quick' if args.quick else ''}.json"
    # metal caches written before vertebrae_png existed hold no vertebra masks: vertebrae get their own
    args.data = args.data or CACHE / "bench" / f"anatomy_synth{target_tag}"
    task = TASK[args.target]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Invalid value for VR")  # synth's fake header times
    n, epochs, head_steps, seeds = (120, 3, 40, 1) if args.quick else (240, 9, 150, args.seeds)
    t0 = time.time()
    items = synth_items(args.data / str(n), n, size=128, per_study=8, target=args.target)
    n_patients = items[-1].extra["patient"] + 1
    test_from = n_patients - max(1, n_patients // 5)
    pool = [it for it in items if it.extra["patient"] < test_from]
    seg = get_task(task)

    def positive(it: LabeledImage) -> bool:
        m = seg.label_mask(it)
        return m is not None and bool(m.any())

    test = [it for it in items if it.extra["patient"] >= test_from and positive(it)]
    labelled_pool = [it for it in pool if positive(it)]
    print(f"{len(pool)} pretraining images ({len(labelled_pool)} with {args.target}), "
          f"{len(test)} test images with {args.target}")

    backbones: dict[str, torch.nn.Module] = {}
    pretrain: dict[str, Any] = {}
    unlabeled = [{"image": torch.from_numpy(it.image)[None]} for it in pool]
    for method in ("dino", "anatomy"):
        tag = "" if (args.base_lr, args.out_dim) == (5e-3, 1024) else f"_lr{args.base_lr:g}_k{args.out_dim}"
        out = args.work / f"{method}_{args.arch}_{n}{tag}{'_quick' if args.quick else ''}"
        summary = train(pretrain_cfg(method, args.arch, epochs, 0, args.base_lr, args.out_dim), out, unlabeled)  # a finished run is reused
        backbones[method], _ = load_backbone(str(out))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        keep = ("loss", "localizability", "composability", "decomposability", "teacher_entropy")
        pretrain[method] = {"steps": summary.steps, "final": {k: round(records[-1][k], 4) for k in keep
                                                               if k in records[-1]},
                            "images_per_s": round(float(np.mean([r["images_per_s"] for r in records])), 2),
                            "run": str(out)}
        print(summary.line())
    torch.manual_seed(0)
    backbones["random"] = create_backbone(args.arch, img_size=64).eval()

    test_images = [torch.from_numpy(it.image)[None] for it in test]
    part_whole = {name: {f"g{g}{'_centred' if c else ''}": round(float(part_whole_similarity(
        bb, test_images, granularity=g, size=64, centre=c).mean()), 4) for g in (0, 1) for c in (False, True)}
        for name, bb in backbones.items()}
    print("part-whole cosine:", part_whole)

    dice: dict[str, dict[str, list[float]]] = {name: {} for name in backbones}
    for name, bb in backbones.items():
        for shots in SHOTS:
            scores = [fewshot(bb, labelled_pool, test, shots, s, 128, head_steps, task) for s in range(seeds)]
            dice[name][str(shots)] = [round(v, 4) for v in scores]
            print(f"{name:8s} {shots:2d} shots: Dice {np.mean(scores):.3f} ({', '.join(f'{v:.3f}' for v in scores)})")
    result = {
        "command": "benchmarks/anatomy_fewshot.py" + (" --quick" if args.quick else f" --seeds {seeds}")
        + f" --base-lr {args.base_lr:g} --out-dim {args.out_dim} --target {args.target}",
        "target": args.target,
        "arch": args.arch, "n_images": n, "n_pretrain": len(pool), "n_test": len(test), "image_size": 128,
        "pretrain": pretrain, "pretrain_config": {"global_size": 64, "local_size": 32, "batch_size": 16,
                                                  "epochs": epochs, "base_lr": args.base_lr,
                                                  "out_dim": args.out_dim, "dino_crops": "2x64 + 6x32",
                                                  "anatomy_crops": "2x64 + 2x32 + 4 parts x32"},
        "head": {"name": "seg_decoder", "task": task,
                 "width": HEAD_WIDTH, "img_size": 128, "steps": head_steps, "batch": 8,
                 "lr": 3e-3, "frozen_backbone": True},
        "dice_mean": {name: {k: round(float(np.mean(v)), 4) for k, v in per.items()} for name, per in dice.items()},
        "dice_per_seed": dice, "part_whole_cosine": part_whole,
        "seconds": round(time.time() - t0, 1), "threads": args.threads, "load_avg_1min": os.getloadavg()[0],
        "versions": versions(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
