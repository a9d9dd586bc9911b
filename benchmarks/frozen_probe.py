"""Frozen pooled features of several backbones on one labelled lake: body-region kNN, a linear
probe and the part-whole similarity, all on the held-out test split.

For every backbone (``NAME=RUN`` / ``RUN`` for a pretrain run or bundle, ``random:ARCH`` for a
random-init one of the same architecture):

* weighted kNN (k 20, T 0.07, DINO protocol) with the labelled train split as the bank and the
  test split as queries: accuracy, balanced accuracy (mean recall over the classes present) and
  the confusion matrix;
* a linear probe: standardised features -> multinomial logistic regression (scikit-learn, C 0.5);
* part-whole cosine similarity (``xrayfm.ssl.anatomy.part_whole_similarity``, windows of
  granularity 0 and 1 at ``--img-size``, parts at half of it), raw and centred, over the test
  images.

Plus, once, the classical no-deep-learning reference: PCA + RBF SVM on 32x32 thumbnails.

``--fractions 0.01,0.1,1`` adds a label-efficiency block: for each fraction of the labelled train
split (``label_subset``: seeded, stratified by region, at least one image per region), the
accuracy of kNN, the linear probe and PCA + SVM on each backbone's features, and of PCA + SVM on
the thumbnails, all on the same subsets.

    .venv/bin/python benchmarks/frozen_probe.py --lake LAKE --labels SYNTH_RUN \
        --backbone dino=runs/resnet18 --backbone random:resnet18 [--img-size 128] [--threads 2] \
        [--fractions 0.01,0.1,1] [--out benchmarks/results/frozen_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import backbone_from_spec, bank_and_query, linear_probe_scores, subset_index

from xrayfm.config import atomic_write_text, versions
from xrayfm.ssl.anatomy import part_whole_similarity
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.classify import classical_scores, knn_scores
from xrayfm.tasks.data import LabeledImage, resize_item
from xrayfm.tasks.evaluate import pooled_features
from xrayfm.tasks.metrics import classification_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "frozen_probe.json"


def _summary(y_true: np.ndarray, scores: np.ndarray, classes: list[int]) -> dict[str, Any]:
    m = classification_metrics(y_true, scores, len(REGIONS))
    cm = np.asarray(m["confusion_matrix"])[np.ix_(classes, classes)]
    recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
    return {"accuracy": round(m["accuracy"], 4), "balanced_accuracy": round(float(recall.mean()), 4),
            "confusion_matrix": cm.tolist()}


def fraction_accuracies(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray,
                        subsets: dict[float, np.ndarray], methods: tuple[str, ...]) -> dict[str, Any]:
    """Test accuracy of each method trained on each labelled subset of the train features."""
    fit = {"knn": lambda x, y: knn_scores(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(fte),
                                          len(REGIONS)).numpy(),
           "linear_probe": lambda x, y: linear_probe_scores(x, y, fte),
           "pca_svm": lambda x, y: classical_scores(x, y, fte, len(REGIONS))}
    return {str(f): {"n_train": len(idx), **{m: round(float((fit[m](ftr[idx], ytr[idx]).argmax(1) == yte).mean()), 4)
                                           for m in methods}} for f, idx in subsets.items()}


def probe(backbone: torch.nn.Module, train: list[LabeledImage], test: list[LabeledImage], img_size: int,
          classes: list[int], subsets: dict[float, np.ndarray]) -> dict[str, Any]:
    ytr = np.array([it.region_index for it in train])
    yte = np.array([it.region_index for it in test])
    ftr, fte = pooled_features(backbone, train, img_size), pooled_features(backbone, test, img_size)
    fractions = fraction_accuracies(ftr.numpy(), ytr, fte.numpy(), yte, subsets, ("knn", "linear_probe", "pca_svm"))
    images = [torch.from_numpy(resize_item(it, img_size).image)[None] for it in test]
    part_whole = {f"g{g}{'_centred' if c else ''}": round(float(part_whole_similarity(
        backbone, images, granularity=g, size=img_size, centre=c).mean()), 4) for g in (0, 1) for c in (False, True)}
    return {"knn": _summary(yte, knn_scores(ftr, torch.from_numpy(ytr), fte, len(REGIONS)).numpy(), classes),
            "linear_probe": _summary(yte, linear_probe_scores(ftr.numpy(), ytr, fte.numpy()), classes),
            "part_whole_cosine": part_whole, "label_fractions": fractions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--backbone", action="append", required=True)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", default="", help="label fractions for the label-efficiency block, e.g. 0.01,0.1,1")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = bank_and_query(args.lake, args.labels, "test")
    classes = sorted({it.region_index for it in train} | {it.region_index for it in test})
    thumbs = [np.stack([resize_item(it, 32).image.ravel() for it in s]) for s in (train, test)]
    ytr, yte = (np.array([it.region_index for it in s]) for s in (train, test))
    pixels = _summary(yte, classical_scores(thumbs[0], ytr, thumbs[1], len(REGIONS)), classes)
    subsets = {float(f): subset_index(train, float(f)) for f in args.fractions.split(",") if f}
    pixels["label_fractions"] = fraction_accuracies(thumbs[0], ytr, thumbs[1], yte, subsets, ("pca_svm",))
    print(f"pixels PCA+SVM: accuracy {pixels['accuracy']:.3f} {pixels['label_fractions']}", flush=True)
    rows: dict[str, Any] = {}
    for spec in args.backbone:
        label, bb = backbone_from_spec(spec)
        rows[label] = probe(bb, train, test, args.img_size, classes, subsets)
        r = rows[label]
        print(f"{label}: kNN {r['knn']['accuracy']:.3f} (balanced {r['knn']['balanced_accuracy']:.3f}), "
              f"linear {r['linear_probe']['accuracy']:.3f}, part-whole {r['part_whole_cosine']}, "
              f"label fractions {r['label_fractions']}", flush=True)
    result = {"lake": args.lake, "labels": args.labels, "n_train": len(train), "n_test": len(test),
              "img_size": args.img_size, "classes": [REGIONS[c] for c in classes],
              "pixels_pca_svm": pixels, "backbones": rows, "threads": args.threads,
              "load_avg_1m": os.getloadavg()[0], "versions": versions()}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
