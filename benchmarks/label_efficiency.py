"""Label efficiency of the frozen-backbone heads: test metrics at several label fractions, per backbone.

For every backbone (a pretrain run / exported bundle, or ``random:ARCH`` for a random-init one),
every task and every label fraction, a head is trained on the feature cache of that fraction of
the lake's labelled train split and scored on its test split. Heads get about the same number of
optimiser steps at every fraction (``--steps``; epochs = steps / batches per epoch, clamped to
``--min-epochs``..``--max-epochs``), so small fractions are not also short of training.

Segmentation and detection subsets are drawn at random over all labelled images (images without
metal or screws are labelled too: their targets are empty); classification subsets are
stratified by body region. With ``--draws N`` every fraction below 1 is drawn N times (seeds
``--seed`` .. ``--seed+N-1``, each also the head's init); its row holds the mean over the draws,
the sample std of each metric (``std``) and every draw (``draws``).

    .venv/bin/python benchmarks/label_efficiency.py --lake LAKE --labels SYNTH_RUN \
        --backbone dino=runs/resnet18 --backbone random:resnet18 [--fractions 0.01,0.1,1]
        [--tasks classify,segment,detect] [--img-size 128] [--steps 300] [--draws 3] [--threads 2] [--dihedral]
        [--feature-norm standardize|layernorm] [--pool auto|final|multilevel] [--unfreeze N] [--tune]
        [--out benchmarks/results/label_efficiency.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from common import backbone_from_spec

from xrayfm.config import atomic_write_text, versions
from xrayfm.models.backbones import POOLINGS
from xrayfm.models.heads import POOLED_NORMS
from xrayfm.models.runtime import AUTOCAST_PRECISIONS
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import label_subset, load_labeled_images
from xrayfm.tasks.detect import DetectTask
from xrayfm.tasks.metrics import mean_over_runs
from xrayfm.tasks.train import HeadTrainConfig, predict_items, train_head

RESULTS = Path(__file__).resolve().parent / "results" / "label_efficiency.json"
KEYS = {"classify": ("accuracy", "recall_macro", "top3_accuracy"),
        "segment": ("dice_mean", "dice_positive_mean", "iou_mean", "empty_fp_rate"),
        "detect": ("precision", "recall", "ap", "head_error_px", "tip_error_px", "angle_error_deg",
                   "angle_error_median_deg", "reversed_rate", "recall_by_length_px", "angle_by_length_px",
                   "missed_near", "superimposed")}


def _epochs(n_items: int, batch: int, steps: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, math.ceil(steps / max(1, math.ceil(n_items / batch)))))


def _rounded(m: dict[str, Any], task_name: str) -> dict[str, Any]:
    return {k: (round(m[k], 4) if isinstance(m[k], float) else m[k]) for k in KEYS[task_name]}


def _one_run(args: argparse.Namespace, bb: Any, task_name: str, frac: float, seed: int,
             train: list[Any], val: list[Any], test: list[Any]) -> dict[str, Any]:
    """Train one head on the ``seed`` draw of ``frac`` of the labels and score it on ``test``."""
    task = get_task(task_name)  # fresh per run, so at its default threshold until tuned below
    if isinstance(task, DetectTask):
        task.max_dist = args.max_dist
    key = "region_index" if task_name == "classify" else None
    n_items = len(label_subset([it for it in train if task.has_label(it)], frac, seed, key))
    epochs = _epochs(n_items, args.batch_size, args.steps, args.min_epochs, args.max_epochs)
    lr = 3e-3 if task_name == "segment" else 1e-2
    cfg = HeadTrainConfig(task=task_name, img_size=args.img_size, epochs=epochs,
                          batch_size=args.batch_size, lr=lr, label_fraction=frac, seed=seed,
                          dihedral=args.dihedral, feature_norm=args.feature_norm, pool=args.pool,
                          unfreeze=args.unfreeze, out_stride=args.out_stride,
                          image_skip=args.image_skip, precision=args.precision)
    t0 = time.perf_counter()
    head, _ = train_head(bb, train, cfg)
    train_s = time.perf_counter() - t0
    soft = predict_items(bb, head, task, test, args.img_size, soft=True)
    row = {"task": task_name, "fraction": frac, "seed": seed, "n_train": n_items, "epochs": epochs,
           "train_s": round(train_s, 1), **({"pool": cfg.pool} if task_name == "classify" else {}),
           **_rounded(task.metrics(task.decide(soft), test), task_name)}
    if args.tune and task.threshold is not None:  # as `heads train`: threshold chosen on val
        op = task.tune_threshold(predict_items(bb, head, task, val, args.img_size, soft=True), val)
        if op is not None:
            task.apply_operating_point(op)
            row["tuned"] = {**{k: round(v, 4) for k, v in task.operating_point().items()},
                            "val_" + op["criterion"]: round(op["value"], 4),
                            **_rounded(task.metrics(task.decide(soft), test), task_name)}
    return row


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result row: the run itself, or for several label draws the mean of their metrics
    (``seed`` becomes the list of seeds), the sample std of each top-level metric and every draw."""
    if len(runs) == 1:
        return runs[0]
    fixed = ("task", "fraction", "n_train", "epochs", "pool")  # the same in every draw
    metrics = [{k: v for k, v in r.items() if k not in (*fixed, "seed")} for r in runs]
    mean, std = mean_over_runs(metrics)
    mean = _rounded_tree(mean)
    return {**{k: runs[0][k] for k in fixed if k in runs[0]}, "seed": [r["seed"] for r in runs], **mean,
            "std": {k: round(v, 4) for k, v in std.items() if v is not None},
            "draws": runs}


def _rounded_tree(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _rounded_tree(x) for k, x in v.items()}
    return round(v, 4) if isinstance(v, float) else v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--backbone", action="append", required=True)
    ap.add_argument("--fractions", default="0.01,0.1,1")
    ap.add_argument("--tasks", default="classify,segment,detect")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--min-epochs", type=int, default=5)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="label draw and head init of the first draw")
    ap.add_argument("--draws", type=int, default=1,
                    help="label draws (seeds --seed, --seed+1, ...) per fraction below 1; rows then hold "
                         "the mean, the std and every draw (a 10 %% subset's draw moves a dense head's "
                         "score by 10-20 points)")
    ap.add_argument("--dihedral", action="store_true", help="heads train with random rot90/mirror (8-view cache)")
    ap.add_argument("--unfreeze", type=int, default=0,
                    help="fine-tune the last N blocks/stages (-1: all) at lr/10 instead of the frozen cache")
    ap.add_argument("--feature-norm", default="standardize", choices=POOLED_NORMS,
                    help="the region head's input normalisation (HeadTrainConfig.feature_norm)")
    ap.add_argument("--pool", default="auto", choices=("auto", *POOLINGS),
                    help="the region head's pooled embedding (HeadTrainConfig.pool)")
    ap.add_argument("--out-stride", type=int, default=4, choices=(1, 2, 4),
                    help="segment/detect heads' output stride (HeadTrainConfig.out_stride); 4 here for "
                         "comparison with the earlier results, while `heads train` gives the metal head 2")
    ap.add_argument("--image-skip", action="store_true",
                    help="segment/detect heads also read the input image (HeadTrainConfig.image_skip; off "
                         "here unless given, on by default for the metal head of `heads train`)")
    ap.add_argument("--precision", default="auto", choices=AUTOCAST_PRECISIONS,
                    help="heads' forward pass (HeadTrainConfig.precision; auto = bf16 on an AMX/AVX-512 CPU)")
    ap.add_argument("--max-dist", type=float, default=10.0,
                    help="screw matching radius in image px (DetectTask.max_dist; scale it with the image size)")
    ap.add_argument("--tune", action="store_true",
                    help="also report segment/detect test metrics at the threshold tuned on the val split")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.draws < 1:
        raise SystemExit(f"--draws {args.draws}: give 1 or more label draws per fraction")
    torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    tasks = args.tasks.split(",")
    train, _ = load_labeled_images(args.lake, args.labels, "train")
    test, _ = load_labeled_images(args.lake, args.labels, "test")
    val = load_labeled_images(args.lake, args.labels, "val")[0] if args.tune else []
    if args.tune and not val:
        raise SystemExit(f"{args.lake}: --tune needs labelled val images")
    if not train or not test:
        raise SystemExit(f"{args.lake}: needs labelled train and test images (got {len(train)} / {len(test)})")
    rows: list[dict[str, Any]] = []
    for spec in args.backbone:
        label, bb = backbone_from_spec(spec)
        for task_name in tasks:
            for frac in fractions:
                runs = []
                for seed in range(args.seed, args.seed + (args.draws if frac < 1 else 1)):
                    if args.unfreeze:  # fine-tuning changes the backbone in place: start each run afresh
                        bb = backbone_from_spec(spec)[1]
                    runs.append(_one_run(args, bb, task_name, frac, seed, train, val, test))
                    print(json.dumps({"backbone": label, **runs[-1]}), flush=True)
                rows.append({"backbone": label, **_combine(runs)})
                if len(runs) > 1:
                    print(json.dumps({"backbone": label, **{k: v for k, v in rows[-1].items() if k != "draws"}}),
                          flush=True)
    result = {"lake": args.lake, "n_train": len(train), "n_test": len(test), "img_size": args.img_size,
              "steps": args.steps, "draws": args.draws, "dihedral": args.dihedral, "tune": args.tune,
              "feature_norm": args.feature_norm, "pool": args.pool, "unfreeze": args.unfreeze, "out_stride": args.out_stride, "image_skip": args.image_skip,
              "precision": args.precision, "threads": args.threads, "load_avg_1m": os.getloadavg()[0],
              "versions": versions(), "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
