"""Why the linear region head trails a logistic regression on the same frozen features.

``LinearHead`` normalises each embedding across its features (parameter-free LayerNorm);
scikit-learn's pipeline standardises each feature over the training set. DINO features put most
of their variance in a few directions (docs/pretrain.md), so the two differ. This trains the same
linear layer the way ``train_head`` does (AdamW, one-cycle, batch 32, weight decay 1e-4) on the
cached pooled features of the labelled train split, with either input normalisation and a few
peak learning rates, and scores it on the test split next to the logistic-regression probe.

    .venv/bin/python benchmarks/classify_head_norm.py --lake LAKE --labels SYNTH_RUN --backbone RUN \
        [--img-size 128] [--epochs 32] [--out benchmarks/results/classify_head_norm.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import backbone_from_spec, bank_and_query, linear_probe_scores
from torch import nn

from xrayfm.config import atomic_write_text, versions
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.evaluate import pooled_features


def train_linear(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, norm: str,
                 lr: float, epochs: int, batch: int = 32, weight_decay: float = 1e-4) -> float:
    """Test accuracy of a linear layer on ``layernorm``- or ``standardize``-normalised features."""
    torch.manual_seed(0)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    pre = (lambda x: F.layer_norm(x, x.shape[1:])) if norm == "layernorm" else (lambda x: (x - mu) / sd)
    fc = nn.Linear(ftr.shape[1], len(REGIONS))
    opt = torch.optim.AdamW(fc.parameters(), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * int(np.ceil(len(ftr) / batch)))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(ftr), generator=g).split(batch):
            loss = F.cross_entropy(fc(pre(ftr[idx])), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return round((fc(pre(fte)).argmax(1) == yte).float().mean().item(), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--backbone", required=True, help="NAME=RUN, RUN or random:ARCH[:INPUT_NORM]")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "classify_head_norm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = bank_and_query(args.lake, args.labels, "test")
    label, bb = backbone_from_spec(args.backbone)
    with torch.no_grad():
        ftr, fte = pooled_features(bb, train, args.img_size), pooled_features(bb, test, args.img_size)
    ytr = torch.tensor([it.region_index for it in train])
    yte = torch.tensor([it.region_index for it in test])
    logreg = float((linear_probe_scores(ftr.numpy(), ytr.numpy(), fte.numpy()).argmax(1) == yte.numpy()).mean())
    result = {"backbone": label, "n_train": len(train), "n_test": len(test), "img_size": args.img_size,
              "epochs": args.epochs, "logistic_regression": round(logreg, 4),
              "linear_head": {norm: {str(lr): train_linear(ftr, ytr, fte, yte, norm, lr, args.epochs)
                                     for lr in (1e-3, 1e-2, 1e-1)} for norm in ("layernorm", "standardize")},
              "versions": versions()}
    print(json.dumps({k: result[k] for k in ("backbone", "logistic_regression", "linear_head")}))
    atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
