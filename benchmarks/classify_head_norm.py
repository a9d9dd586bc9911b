"""How the pooled region head should normalise its input, measured on frozen features.

``LinearHead`` used to normalise each embedding across its features (parameter-free LayerNorm);
scikit-learn's probe standardises each feature over the training set. DINO features put most of
their variance in a few directions (docs/pretrain.md), so the two differ. This trains the shipped
``LinearHead`` the way ``train_head`` does (AdamW, one-cycle, batch 32, weight decay 1e-4, a fixed
number of optimiser steps, classes without a training item switched off) on the cached pooled features of the labelled train subset
(``label_subset``, per seed), with

- ``layernorm``: per-embedding LayerNorm alone (the default before ``feature_norm``),
- ``standardize_only``: per-feature statistics of the labelled subset, no LayerNorm,
- ``standardize``: LayerNorm, then per-feature statistics of the labelled subset (what
  ``train_head`` fits by default),
- ``standardize_all``: the same with statistics of every train image, labelled or not,

and scores it on the test split next to a logistic-regression probe on the same subset.

    .venv/bin/python benchmarks/classify_head_norm.py --lake LAKE --labels SYNTH_RUN --backbone RUN \
        [--img-size 128] [--steps 300] [--fractions 0.01,0.1,1] [--seeds 3] [--lrs 0.01] \
        [--out benchmarks/results/classify_head_norm.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import backbone_from_spec, bank_and_query, linear_probe_scores
from torch import nn

from xrayfm.config import atomic_write_text, versions
from xrayfm.models.heads import LinearHead, input_standardizer, switch_off_classes
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.data import label_subset
from xrayfm.tasks.evaluate import pooled_features

VARIANTS = ("layernorm", "standardize_only", "standardize", "standardize_all")


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_linear(ftr: torch.Tensor, ytr: torch.Tensor, fall: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor,
                 variant: str, lr: float, steps: int, batch: int = 32, weight_decay: float = 1e-4) -> float:
    """Test accuracy of ``LinearHead`` trained for about ``steps`` steps on ``(ftr, ytr)``."""
    torch.manual_seed(0)
    head = LinearHead(ftr.shape[1], len(REGIONS), "layernorm" if variant == "layernorm" else "standardize")
    if variant == "standardize_only":
        mu, sd = ftr.mean(0), ftr.std(0, unbiased=False).clamp_min(1e-6)
        head.norm = _Standardize(mu, sd)
    elif variant != "layernorm":
        input_standardizer(head).fit(fall if variant == "standardize_all" else ftr)  # type: ignore[union-attr]
    per_epoch = math.ceil(len(ftr) / batch)
    epochs = max(1, round(steps / per_epoch))
    opt = torch.optim.AdamW(head.parameters(), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(ftr), generator=g).split(batch):
            loss = F.cross_entropy(head(ftr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    switch_off_classes(head, sorted(set(range(len(REGIONS))) - set(ytr.tolist())))  # as train_head does
    with torch.no_grad():
        return float((head(fte).argmax(1) == yte).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--backbone", required=True, help="NAME=RUN, RUN or random:ARCH[:INPUT_NORM]")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per head (as label_efficiency.py)")
    ap.add_argument("--fractions", default="1", help="comma-separated label fractions")
    ap.add_argument("--seeds", type=int, default=1, help="label subsets per fraction < 1 (seeds 0..N-1)")
    ap.add_argument("--lrs", default="0.001,0.01,0.1", help="comma-separated peak learning rates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "classify_head_norm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = bank_and_query(args.lake, args.labels, "test")
    label, bb = backbone_from_spec(args.backbone)
    with torch.no_grad():
        fall, fte = pooled_features(bb, train, args.img_size), pooled_features(bb, test, args.img_size)
    yall = torch.tensor([it.region_index for it in train])
    yte = torch.tensor([it.region_index for it in test])
    row = {it.image_id: i for i, it in enumerate(train)}
    lrs = [float(v) for v in args.lrs.split(",")]
    table: dict[str, dict[str, object]] = {}
    for frac in (float(v) for v in args.fractions.split(",")):
        runs: dict[str, list[float]] = {}
        for seed in range(args.seeds if frac < 1 else 1):
            idx = torch.tensor([row[it.image_id] for it in label_subset(train, frac, seed)])
            ftr, ytr = fall[idx], yall[idx]
            scores = linear_probe_scores(ftr.numpy(), ytr.numpy(), fte.numpy())
            runs.setdefault("logistic_regression", []).append(float((scores.argmax(1) == yte.numpy()).mean()))
            for variant in VARIANTS:
                for lr in lrs:
                    acc = train_linear(ftr, ytr, fall, fte, yte, variant, lr, args.steps)
                    runs.setdefault(f"{variant}@{lr:g}", []).append(acc)
        table[f"{frac:g}"] = {"n_labelled": len(idx), "mean": {k: round(float(np.mean(v)), 4) for k, v in runs.items()},
                              "per_seed": {k: [round(a, 4) for a in v] for k, v in runs.items()}}
        print(f"fraction {frac:g}:", json.dumps(table[f"{frac:g}"]["mean"]), flush=True)
    result = {"backbone": label, "n_train": len(train), "n_test": len(test), "img_size": args.img_size,
              "steps": args.steps, "accuracy": table, "versions": versions()}
    atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
