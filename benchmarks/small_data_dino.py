"""Small-data DINO probe: short pretraining runs on a labelled lake's train split, probed every epoch.

    .venv/bin/python benchmarks/small_data_dino.py --lake LAKE --labels SYNTH_RUN --arch resnet18 \
        --exp 'weak={}' --exp 'strong={"augment": {"window_p": 0.8, "gamma_p": 0.8}}' \
        [--size 64] [--threads 2] [--out benchmarks/results/small_data_dino.json]

Base settings: the demo's small-data recipe (``xrayfm.cli.demo.SMALL_DATA_PRETRAIN``), 8 epochs,
batch 32, global crops ``--size`` px, no local crops, out_dim 1024; each ``--exp NAME=JSON``
overrides any ``PretrainConfig`` key (``augment`` keys merge into the recipe's). Train images (plus
every image of each ``--unlabelled-lake``, whose labels are never read) are held in memory at 1.5 x
``--size``. After every epoch the teacher (what DINO exports) and the student backbones are probed
on the val split against the train split, at ``--size`` px: class-balanced weighted kNN (k 20, T
0.07, DINO protocol), the same kNN on features centred by the bank mean, and a linear probe
(standardised features, logistic regression); the random init of the same architecture is probed
once. Prints a line per epoch and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from common import balanced_region_accuracy, bank_and_query, linear_probe_scores, resized_source

from xrayfm.cli.demo import SMALL_DATA_PRETRAIN
from xrayfm.config import atomic_write_text, versions
from xrayfm.models.backbones import INPUT_NORMS, create_backbone
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.multicrop import AugmentConfig
from xrayfm.ssl.trainer import Trainer
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.classify import knn_scores
from xrayfm.tasks.data import LabeledImage, lake_items
from xrayfm.tasks.evaluate import pooled_features

RESULTS = Path(__file__).resolve().parent / "results" / "small_data_dino.json"


class Prober:
    """Balanced kNN, centred kNN and linear-probe accuracy of a backbone's pooled features."""

    def __init__(self, bank: list[LabeledImage], query: list[LabeledImage], size: int) -> None:
        self.bank, self.query, self.size = bank, query, size
        self.y_bank = np.array([it.region_index for it in bank])
        self.y_query = np.array([it.region_index for it in query])

    def balanced(self, scores: np.ndarray) -> float:
        return balanced_region_accuracy(self.y_query, scores)

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        fb, fq = pooled_features(backbone, self.bank, self.size), pooled_features(backbone, self.query, self.size)
        yb = torch.from_numpy(self.y_bank)
        mu = fb.mean(0, keepdim=True)
        z = F.normalize(fb, dim=1)
        return {"knn": self.balanced(knn_scores(fb, yb, fq, len(REGIONS)).numpy()),
                "knn_centred": self.balanced(knn_scores(fb - mu, yb, fq - mu, len(REGIONS)).numpy()),
                "linear": self.balanced(linear_probe_scores(fb.numpy(), self.y_bank, fq.numpy())),
                "mean_cosine": round(float((z @ z.T).mean()), 4)}


class TeacherStudentMonitor:
    """The trainer's per-epoch monitor: probes the teacher it is given and the trainer's student
    after every ``every``-th epoch and the last one (an empty record otherwise)."""

    def __init__(self, probe: Prober, epochs: int, every: int = 1) -> None:
        self.probe, self.epochs, self.every = probe, epochs, every
        self.trainer: Trainer | None = None
        self.calls = 0

    def __call__(self, teacher: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        if self.calls % self.every and self.calls != self.epochs:
            return {}
        student = self.probe(self.trainer.method.student.backbone)  # type: ignore[union-attr]
        return {**self.probe(teacher), **{f"student_{k}": v for k, v in student.items()}}


def lake_images(lake: str) -> list[LabeledImage]:
    """Every image of a lake, without labels (pretraining data only)."""
    items = lake_items(lake)
    if not items:
        raise SystemExit(f"--unlabelled-lake {lake}: no images")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--exp", action="append", required=True, help="NAME=JSON config overrides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-norm", choices=INPUT_NORMS, help="the backbones' input_norm, random init "
                    "included (default: the recipe's)")
    ap.add_argument("--probe-every", type=int, default=1, help="probe after every N-th epoch (and the last)")
    ap.add_argument("--unlabelled-lake", action="append", default=[],
                    help="also pretrain on every image of this lake (any split; its labels are never read)")
    ap.add_argument("--workdir", default="/tmp/small_data_dino")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    train, val = bank_and_query(args.lake, args.labels)
    side = int(args.size * 1.5)
    extra = [it for lake in args.unlabelled_lake for it in lake_images(lake)]
    source = resized_source(train + extra, side)
    probe = Prober(train, val, args.size)
    torch.manual_seed(0)
    recipe = yaml.safe_load(SMALL_DATA_PRETRAIN)
    input_norm = args.input_norm or recipe.get("input_norm", "fixed")
    random_init = probe(create_backbone(args.arch, img_size=args.size, input_norm=input_norm))
    print(f"n_train={len(train)} n_val={len(val)} {args.arch} random init: {random_init}", flush=True)
    base: dict[str, Any] = {"arch": args.arch, "epochs": 8, "batch_size": 32, "global_size": args.size,
                            "local_size": args.size // 2, "n_local": 0, "out_dim": 1024, "num_workers": 0,
                            "log_every": 5, "checkpoint_every": 10**6, **recipe,
                            "input_norm": input_norm}
    runs: dict[str, Any] = {}
    result = {"lake": args.lake, "arch": args.arch, "size": args.size, "n_train": len(train), "n_val": len(val),
              "unlabelled_lakes": args.unlabelled_lake, "n_unlabelled": len(extra),
              "base": {k: v for k, v in base.items() if k != "augment"} | {"augment": base.get("augment", {})},
              "random_init": random_init, "runs": runs, "threads": args.threads, "versions": versions()}
    for spec in args.exp:
        name, _, text = spec.partition("=")
        over = json.loads(text or "{}")
        if "input_norm" in over:
            raise SystemExit(f"--exp {name}: set the input norm with --input-norm (the random init follows it)")
        kw = {**base, **{k: v for k, v in over.items() if k != "augment"}}
        kw["augment"] = replace(AugmentConfig(), **{**base.get("augment", {}), **over.get("augment", {})})
        cfg = PretrainConfig(**kw)
        out = Path(args.workdir, name)
        shutil.rmtree(out, ignore_errors=True)
        monitor = TeacherStudentMonitor(probe, cfg.epochs, args.probe_every)
        t0 = time.perf_counter()
        monitor.trainer = Trainer(cfg, out, source, show_progress=False, monitor=monitor)
        monitor.trainer.fit()
        logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [e for line in (out / "monitor.jsonl").read_text().splitlines() if "knn" in (e := json.loads(line))]
        for e in epochs:
            print(f"{name} epoch {e['epoch']}: teacher kNN {e['knn']:.3f} (centred {e['knn_centred']:.3f}, "
                  f"linear {e['linear']:.3f}); student kNN {e['student_knn']:.3f} "
                  f"(centred {e['student_knn_centred']:.3f}, linear {e['student_linear']:.3f})", flush=True)
        runs[name] = {"overrides": over, "steps": logs[-1]["step"] if logs else 0,
                      "seconds": round(time.perf_counter() - t0, 1), "epochs": epochs,
                      "log": [{k: r[k] for k in ("step", "loss", "teacher_entropy", "kl")} for r in logs]}
        print(f"{name}: final loss {logs[-1]['loss']:.3f}, teacher entropy {logs[-1]['teacher_entropy']:.2f} "
              f"(ln K {np.log(cfg.out_dim):.2f}), {runs[name]['seconds']:.0f} s", flush=True)
        result["load_avg_1m"] = os.getloadavg()[0]
        atomic_write_text(args.out, json.dumps(result, indent=2))  # after every run: partial results survive
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
