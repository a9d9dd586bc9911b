"""Body-region classification: heads with cross-entropy, weighted kNN, and a classical baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xrayfm.models.heads import switch_off_classes
from xrayfm.tasks.base import HeadTask, register_task
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.metrics import classification_metrics


@register_task
class ClassifyTask(HeadTask):
    """Single-label classification of ``item.region_index``."""

    name = "classify"
    default_head = "linear"
    input_kind = "pooled"

    def __init__(self, num_classes: int | None = None) -> None:
        if num_classes is None:
            from xrayfm.synth.regions import REGIONS

            num_classes = len(REGIONS)
        super().__init__(num_classes)

    def has_label(self, item: LabeledImage) -> bool:
        return item.region_index is not None

    def head_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def finish_head(self, head: nn.Module, items: Sequence[LabeledImage]) -> None:
        """Switch off the classes no training item carries: they get probability ~0 instead of a
        logit the training never constrained (with 1 % of the labels, a head on standardised
        features otherwise sends a few test images to regions absent from the lake)."""
        seen = {int(it.region_index) for it in items}  # type: ignore[arg-type]
        switch_off_classes(head, [c for c in range(self.num_classes) if c not in seen])

    def targets(self, items: Sequence[LabeledImage]) -> dict[str, Tensor]:
        y = torch.tensor([int(it.region_index) for it in items], dtype=torch.long)  # type: ignore[arg-type]
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"class index outside [0, {self.num_classes}); set num_classes to cover every label")
        return {"y": y}

    def loss(self, out: Tensor, targets: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(out, targets["y"])

    def predict(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[np.ndarray]:
        return list(torch.softmax(out.float(), dim=1).cpu().numpy())

    def metrics(self, preds: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any]:
        scores = np.stack(preds) if preds else np.zeros((0, self.num_classes))
        return classification_metrics([it.region_index for it in items], scores, self.num_classes)


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Weighted kNN (DINO protocol): cosine similarity, the ``k`` nearest training samples vote
    with weight ``exp(sim / T)``; returns class scores ``(N_test, num_classes)``."""
    if train_x.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample; check the train split")
    tr = F.normalize(train_x.float(), dim=1)
    k = min(k, tr.shape[0])
    out = []
    for i in range(0, test_x.shape[0], chunk):
        te = F.normalize(test_x[i:i + chunk].float(), dim=1)
        sim, idx = (te @ tr.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(te.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx].long(), w)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def classical_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
                     model: str = "svm", n_components: int = 64, seed: int = 0) -> np.ndarray:
    """PCA (whitened) + RBF SVM or random forest on any feature matrix (backbone features or raw
    thumbnails); returns class scores ``(N_test, num_classes)`` summing to 1 (random forest:
    vote fractions; SVM: softmax of the one-vs-rest decision values)."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if model not in ("svm", "rf"):
        raise ValueError(f"classical model {model!r} is not one of svm, rf")
    n_comp = max(1, min(n_components, train_x.shape[0] - 1, train_x.shape[1]))
    clf = (SVC(decision_function_shape="ovr", random_state=seed) if model == "svm"
           else RandomForestClassifier(n_estimators=200, random_state=seed))
    pipe = make_pipeline(StandardScaler(), PCA(n_comp, whiten=True, random_state=seed), clf)
    pipe.fit(train_x, train_y)
    if model == "rf":
        part = pipe.predict_proba(test_x)
    else:
        d = pipe.decision_function(test_x)
        d = np.stack([-d, d], 1) if d.ndim == 1 else d
        e = np.exp(d - d.max(1, keepdims=True))
        part = e / e.sum(1, keepdims=True)
    scores = np.zeros((test_x.shape[0], num_classes))
    scores[:, pipe.classes_.astype(int)] = part
    return scores
