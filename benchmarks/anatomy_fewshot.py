"""Few-shot segmentation (metal or vertebrae) and part-whole similarity: anatomy vs DINO vs random init.

1. Data: with ``--lake LAKE --labels SYNTH_RUN``, the lake's train split pretrains and is the
   labelled pool, its test split is the test set (masks joined by source pixel hash). Without,
   synthesises C-arm images with pedicle screws from the demo CT (``xrayfm.synth.generate``,
   cached in ``--data``), reads them back through ``xrayfm.io`` and joins the masks by pixel hash;
   the last fifth of the patients is the test set.
2. Pretrains the same backbone with the small-data recipe (``xrayfm.cli.demo.SMALL_DATA_PRETRAIN``)
   for the same steps, batch and global crop size, on the images held at 1.5 x the global crop:
   ``dino`` (2 global crops, the recipe's best), ``dino_local4`` (2 global + 4 local crops: the
   same pixels per image as anatomy) and ``anatomy`` (2 global crops + 4 parts at the local size).
3. For random init and each run: frozen backbone, ``seg_decoder`` head (task ``segment`` or
   ``segment_vertebrae``) trained on 3, 6, 12, 24 labelled images (one subset per seed), mean
   Dice on the test images whose target mask is non-empty.
4. Part-whole cosine similarity (``xrayfm.ssl.anatomy.part_whole_similarity``) on the test images;
   with a lake, also class-balanced kNN of body region (test against train) as a sanity check.

    .venv/bin/python benchmarks/anatomy_fewshot.py [--lake LAKE --labels SYNTH_RUN] [--quick] \
        [--seeds 3] [--arch resnet18] [--target metal|vertebrae]

Writes ``benchmarks/results/anatomy_fewshot[_lake][_vertebrae][_quick].json`` (or ``--out``) and
keeps the pretrain runs under ``--work`` (a finished run with the same config is reused; both
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
import yaml
from common import balanced_region_accuracy, resized_source

from xrayfm.cli.demo import SMALL_DATA_PRETRAIN
from xrayfm.config import atomic_write_text, versions
from xrayfm.io import read_any
from xrayfm.models import create_backbone, load_backbone
from xrayfm.ssl import PretrainConfig, train
from xrayfm.ssl.anatomy import part_whole_similarity
from xrayfm.ssl.anatomy_views import AnatomyConfig
from xrayfm.ssl.multicrop import AugmentConfig
from xrayfm.synth.generate import SynthConfig, generate
from xrayfm.synth.labels import read_labels
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.base import get_task
from xrayfm.tasks.classify import knn_scores
from xrayfm.tasks.data import LabeledImage, load_labeled_images
from xrayfm.tasks.evaluate import pooled_features
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


METHODS = {"dino": ("dino", 0), "dino_local4": ("dino", 4), "anatomy": ("anatomy", 0)}  # name: method, n_local
GLOBAL, LOCAL = 64, 32


def pretrain_cfg(name: str, arch: str, epochs: int, batch: int, seed: int) -> PretrainConfig:
    """The small-data recipe; only the method and the number of local crops differ between runs."""
    method, n_local = METHODS[name]
    recipe = yaml.safe_load(SMALL_DATA_PRETRAIN)
    aug = AugmentConfig(**recipe.pop("augment"))
    common: dict[str, Any] = {
        **recipe, "augment": aug, "arch": arch, "method": method, "n_local": n_local, "global_size": GLOBAL,
        "local_size": LOCAL, "out_dim": 1024, "batch_size": batch, "epochs": epochs, "drop_path_rate": 0.0,
        "num_workers": 0, "log_every": 5, "checkpoint_every": 10**6, "seed": seed, "precision": "fp32"}
    if method == "anatomy":
        return PretrainConfig(anatomy=AnatomyConfig(mlp_hidden_dim=512), **common)
    return PretrainConfig(**common)


def region_knn(backbone: torch.nn.Module, bank: list[LabeledImage], query: list[LabeledImage]) -> float:
    """Class-balanced weighted kNN accuracy of body region, pooled features at the global crop size."""
    fb, fq = pooled_features(backbone, bank, GLOBAL), pooled_features(backbone, query, GLOBAL)
    yb = torch.tensor([it.region_index for it in bank])
    return balanced_region_accuracy(np.array([it.region_index for it in query]),
                                    knn_scores(fb, yb, fq, len(REGIONS)).numpy())


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
    ap.add_argument("--lake", help="a labelled lake (its train split pretrains, its test split tests)")
    ap.add_argument("--labels", help="the synth run (or labels.parquet) the lake was ingested from")
    ap.add_argument("--quick", action="store_true", help="~3 min: fewer images, epochs, head steps, one seed")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--target", choices=tuple(TASK), default="metal", help="mask the few-shot heads segment")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, help="pretraining epochs (default 8 with a lake, 9 without, 3 quick)")
    ap.add_argument("--batch", type=int, help="pretraining batch (default 32 with a lake, 16 without)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"pretrain runs, from {', '.join(METHODS)}")
    # one intra-op thread: on a shared 2-core machine two threads spin-wait (5x slower steps here)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", type=Path, help="synth cache (default CACHE/bench/anatomy_synth[_vertebrae])")
    ap.add_argument("--work", type=Path, default=CACHE / "bench" / "anatomy_runs")
    ap.add_argument("--out", type=Path,
                    help="JSON results (default benchmarks/results/anatomy_fewshot[_lake][_vertebrae][_quick].json)")
    args = ap.parse_args()
    if bool(args.lake) != bool(args.labels):
        ap.error("--lake and --labels go together")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    target_tag = "" if args.target == "metal" else f"_{args.target}"
    quick_tag = "_quick" if args.quick else ""
    args.out = args.out or RESULTS / f"anatomy_fewshot{'_lake' if args.lake else ''}{target_tag}{quick_tag}.json"
    # metal caches written before vertebrae_png existed hold no vertebra masks: vertebrae get their own
    args.data = args.data or CACHE / "bench" / f"anatomy_synth{target_tag}"
    task = TASK[args.target]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Invalid value for VR")  # synth's fake header times
    n, epochs, head_steps, seeds = (120, 3, 40, 1) if args.quick else (240, 9, 150, args.seeds)
    epochs = args.epochs or (8 if args.lake and not args.quick else epochs)
    batch = args.batch or (32 if args.lake else 16)
    t0 = time.time()
    seg = get_task(task)

    def positive(it: LabeledImage) -> bool:
        m = seg.label_mask(it)
        return m is not None and bool(m.any())

    if args.lake:
        pool, _ = load_labeled_images(args.lake, args.labels, "train")
        test_all, _ = load_labeled_images(args.lake, args.labels, "test")
        data_name = f"lake{len(pool)}"
    else:
        items = synth_items(args.data / str(n), n, size=128, per_study=8, target=args.target)
        n_patients = items[-1].extra["patient"] + 1
        test_from = n_patients - max(1, n_patients // 5)
        pool = [it for it in items if it.extra["patient"] < test_from]
        test_all = [it for it in items if it.extra["patient"] >= test_from]
        data_name = str(n)
    test = [it for it in test_all if positive(it)]
    labelled_pool = [it for it in pool if positive(it)]
    img_size = pool[0].image.shape[0]
    print(f"{len(pool)} pretraining images ({len(labelled_pool)} with {args.target}), "
          f"{len(test)} test images with {args.target}")

    backbones: dict[str, torch.nn.Module] = {}
    pretrain: dict[str, Any] = {}
    side = int(GLOBAL * 1.5)  # as small_data_dino.py: crops from images held at 1.5 x the global crop
    unlabeled = resized_source(pool, side)
    for name in methods:
        out = args.work / f"recipe_{name}_{args.arch}_{data_name}_e{epochs}_b{batch}{quick_tag}"
        summary = train(pretrain_cfg(name, args.arch, epochs, batch, 0), out, unlabeled)  # a finished run is reused
        backbones[name], _ = load_backbone(str(out))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        keep = ("loss", "localizability", "composability", "decomposability", "teacher_entropy")
        pretrain[name] = {"steps": summary.steps, "final": {k: round(records[-1][k], 4) for k in keep
                                                             if k in records[-1]},
                          "images_per_s": round(float(np.mean([r["images_per_s"] for r in records])), 2),
                          "run": str(out)}
        print(summary.line())
    torch.manual_seed(0)
    input_norm = pretrain_cfg("dino", args.arch, epochs, batch, 0).input_norm  # fed like the pretrained runs
    backbones["random"] = create_backbone(args.arch, img_size=GLOBAL, input_norm=input_norm).eval()

    knn = {name: region_knn(bb, pool, test_all) for name, bb in backbones.items()} if args.lake else {}
    if knn:
        print("region kNN (balanced):", knn)
    test_images = [torch.from_numpy(it.image)[None] for it in test]
    part_whole = {name: {f"g{g}{'_centred' if c else ''}": round(float(part_whole_similarity(
        bb, test_images, granularity=g, size=GLOBAL, centre=c).mean()), 4) for g in (0, 1) for c in (False, True)}
        for name, bb in backbones.items()}
    print("part-whole cosine:", part_whole)

    dice: dict[str, dict[str, list[float]]] = {name: {} for name in backbones}
    for name, bb in backbones.items():
        for shots in SHOTS:
            scores = [fewshot(bb, labelled_pool, test, shots, s, img_size, head_steps, task) for s in range(seeds)]
            dice[name][str(shots)] = [round(v, 4) for v in scores]
            print(f"{name:12s} {shots:2d} shots: Dice {np.mean(scores):.3f} ({', '.join(f'{v:.3f}' for v in scores)})")
    command = ["benchmarks/anatomy_fewshot.py", *(["--lake", args.lake, "--labels", args.labels] if args.lake else []),
               *(["--quick"] if args.quick else ["--seeds", str(seeds)]), "--epochs", str(epochs),
               "--batch", str(batch), "--methods", ",".join(methods), "--target", args.target]
    result = {
        "command": " ".join(command), "target": args.target, "arch": args.arch, "data": args.lake or str(args.data),
        "n_pretrain": len(pool), "n_labelled_pool": len(labelled_pool), "n_test": len(test), "image_size": img_size,
        "pretrain": pretrain, "pretrain_config": {
            "recipe": "xrayfm.cli.demo.SMALL_DATA_PRETRAIN", "source_px": side, "global_size": GLOBAL,
            "local_size": LOCAL, "batch_size": batch, "epochs": epochs, "out_dim": 1024,
            "crops": {"dino": f"2x{GLOBAL}", "dino_local4": f"2x{GLOBAL} + 4x{LOCAL}",
                      "anatomy": f"2x{GLOBAL} + 4 parts x{LOCAL}"}},
        "head": {"name": "seg_decoder", "task": task, "width": HEAD_WIDTH, "img_size": img_size, "steps": head_steps,
                 "batch": 8, "lr": 3e-3, "frozen_backbone": True},
        "dice_mean": {name: {k: round(float(np.mean(v)), 4) for k, v in per.items()} for name, per in dice.items()},
        "dice_per_seed": dice, "part_whole_cosine": part_whole, "region_knn_balanced": knn,
        "seconds": round(time.time() - t0, 1), "threads": args.threads, "load_avg_1min": os.getloadavg()[0],
        "versions": versions(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
