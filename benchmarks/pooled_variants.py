"""Which pooled feature should the region head see? Frozen-backbone probes of several poolings.

    .venv/bin/python benchmarks/pooled_variants.py --lake LAKE --labels SYNTH_RUN \
        --backbone dino_vit=RUN --backbone random:vit_tiny_patch16:equalize [--img-size 128] \
        [--fractions 0.1,1] [--threads 2] [--out benchmarks/results/pooled_variants.json]

``xrayfm:final`` and ``xrayfm:multilevel`` are the embeddings heads read (``Backbone.forward_pooled``,
``HeadTrainConfig.pool``): the backbone's own (ViT: final CLS token; ResNet: global average of the
last stage) and the global average of every dense level concatenated (ViT: patch tokens of the
four blocks feeding the dense heads; ResNet: its four stages). Also, for a ViT: the mean of the
final patch tokens, it and the CLS concatenated, the CLS tokens of the last four blocks
concatenated (DINO's linear evaluation of ViT-S) and those plus the patch mean, every token after
the final norm; for a ResNet: the global average of its last two stages. Both families: ``grid{2,3}_{multilevel,final}``, every
dense level (or the last) averaged over a 2 x 2 or 3 x 3 grid of the image and concatenated, which
keeps where structures lie (the region rules look at the spine's distance from the image centre,
which a global average discards). Each variant is scored on the test split by a linear probe (standardised
features, multinomial logistic regression, C 0.5) and by weighted kNN (k 20, T 0.07), trained on
a ``label_subset`` of the labelled train split per fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import backbone_from_spec, bank_and_query, linear_probe_scores, subset_index

from xrayfm.config import atomic_write_text, versions
from xrayfm.models.backbones import POOLINGS
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.classify import knn_scores
from xrayfm.tasks.data import LabeledImage, images_tensor, resize_item

RESULTS = Path(__file__).resolve().parent / "results" / "pooled_variants.json"


@torch.no_grad()
def pooled_variants(backbone: torch.nn.Module, items: list[LabeledImage], size: int,
                    batch: int = 64) -> dict[str, np.ndarray]:
    """Every pooling variant of ``items`` resized to ``size``: name -> (N, D) float32."""
    backbone.eval()
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(items), batch):
        raw = images_tensor([resize_item(it, size) for it in items[i:i + batch]])
        x, model = backbone.normalise(raw), backbone.model
        if hasattr(model, "blocks"):
            depth = len(model.blocks)
            inter = model.forward_intermediates(x, indices=list(range(depth - 4, depth)), norm=True,
                                                return_prefix_tokens=True, intermediates_only=True)
            cls = [prefix[:, 0] for _, prefix in inter]
            avg = inter[-1][0].mean(dim=(2, 3))
            parts = {"cls": cls[-1], "avg": avg, "cls+avg": torch.cat([cls[-1], avg], 1),
                     "cls_last4": torch.cat(cls, 1), "cls_last4+avg": torch.cat([*cls, avg], 1)}
        else:
            stages = [F.adaptive_avg_pool2d(s, 1).flatten(1) for s in
                      model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)]
            parts = {"gap4": stages[-1], "gap34": torch.cat(stages[2:], 1)}
        parts |= {f"xrayfm:{p}": backbone.forward_pooled(raw, p) for p in POOLINGS}
        dense = backbone.forward_dense(raw)
        for g in (2, 3):  # where things are, kept: each dense level averaged over a g x g grid
            parts[f"grid{g}_multilevel"] = torch.cat([F.adaptive_avg_pool2d(m, g).flatten(1) for m in dense], 1)
            parts[f"grid{g}_final"] = F.adaptive_avg_pool2d(dense[-1], g).flatten(1)
        for k, v in parts.items():
            out.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--backbone", action="append", required=True)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--fractions", default="0.1,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = bank_and_query(args.lake, args.labels, "test")
    y_test = np.array([it.region_index for it in test])
    rows = []
    for spec in args.backbone:
        label, bb = backbone_from_spec(spec)
        t0 = time.perf_counter()
        ftr, fte = pooled_variants(bb, train, args.img_size), pooled_variants(bb, test, args.img_size)
        feat_s = time.perf_counter() - t0
        for frac in (float(f) for f in args.fractions.split(",")):
            idx = subset_index(train, frac, args.seed)
            y = np.array([train[i].region_index for i in idx])
            for name in ftr:
                lin = linear_probe_scores(ftr[name][idx], y, fte[name])
                knn = knn_scores(torch.from_numpy(ftr[name][idx]), torch.from_numpy(y),
                                 torch.from_numpy(fte[name]), len(REGIONS)).numpy()
                row = {"backbone": label, "variant": name, "dim": int(ftr[name].shape[1]), "fraction": frac,
                       "n_train": len(idx), "linear_acc": round(float((lin.argmax(1) == y_test).mean()), 4),
                       "knn_acc": round(float((knn.argmax(1) == y_test).mean()), 4),
                       "feature_s": round(feat_s, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"lake": args.lake, "img_size": args.img_size, "n_train": len(train), "n_test": len(test),
              "threads": args.threads, "load_avg_1m": os.getloadavg()[0], "versions": versions(), "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
