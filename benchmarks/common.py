"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xrayfm.models import create_backbone, load_backbone
from xrayfm.synth.regions import REGIONS
from xrayfm.tasks.data import LabeledImage, label_subset, load_labeled_images
from xrayfm.tasks.metrics import balanced_accuracy, confusion_matrix


def backbone_from_spec(spec: str) -> tuple[str, torch.nn.Module]:
    """``[NAME=]PATH`` (a pretrain run / exported bundle) or ``[NAME=]random:ARCH[:INPUT_NORM]``
    (random init, seed 0, input_norm ``fixed`` unless given); returns (label, backbone)."""
    name, eq, target = spec.partition("=")
    if not eq:
        name, target = "", spec
    if target.startswith("random:"):
        torch.manual_seed(0)
        arch, _, input_norm = target.split(":", 1)[1].partition(":")
        return name or target, create_backbone(arch, input_norm=input_norm or "fixed")
    return name or Path(target).name, load_backbone(target)[0]


def bank_and_query(lake: str, labels: str,
                   query_split: str = "val") -> tuple[list[LabeledImage], list[LabeledImage]]:
    """The lake's labelled train split (kNN bank / training set) and ``query_split``; exits with a
    one-line message when either is empty."""
    bank, _ = load_labeled_images(lake, labels, "train")
    query, _ = load_labeled_images(lake, labels, query_split)
    if not bank or not query:
        raise SystemExit(f"{lake}: needs labelled train and {query_split} images "
                         f"(got {len(bank)} / {len(query)})")
    return bank, query


def linear_probe_scores(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression on standardised features; class scores over all REGIONS."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000))
    pipe.fit(ftr, ytr)
    scores = np.zeros((len(fte), len(REGIONS)))
    scores[:, pipe.classes_.astype(int)] = pipe.predict_proba(fte)
    return scores


def resized_source(items: list[LabeledImage], side: int) -> list[dict[str, torch.Tensor]]:
    """Unlabelled pretraining items: each image area-resized to ``side`` x ``side`` and held in memory."""
    return [{"image": F.interpolate(torch.from_numpy(it.image)[None, None].float(), size=(side, side),
                                    mode="area")[0]} for it in items]


def balanced_region_accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Class-balanced accuracy over all REGIONS of the argmax of ``scores``, rounded to 4 places."""
    return round(balanced_accuracy(confusion_matrix(y_true, scores.argmax(1), len(REGIONS))), 4)


def subset_index(train: list[LabeledImage], fraction: float, seed: int = 0) -> np.ndarray:
    """Positions in ``train`` of the labelled subset that heads get at this fraction and seed
    (``label_subset``, stratified by region)."""
    ids = {it.image_id for it in label_subset(train, fraction, seed)}
    return np.array([i for i, it in enumerate(train) if it.image_id in ids])
