"""Evaluate head bundles on a split, and embed lake images: the API behind the CLI verbs.

``evaluate_heads`` returns the metrics document written by ``xrayfm evaluate``::

    {"backbone": {"arch", "method", "checkpoint"},
     "classification": {"accuracy", "precision_macro", "recall_macro", "f1_macro", "top3_accuracy",
                        "confusion_matrix", "n", "knn_accuracy"?, "baselines"?},
     "segmentation": {"dice_mean", "iou_mean", "boundary_dice_mean", "n", "threshold", ...},
     "vertebrae_segmentation": {same keys as segmentation},
     "detection": {"precision", "recall", "ap", "head_error_px", "tip_error_px", "angle_error_deg",
                   "head_error_mm", "tip_error_mm", "threshold", ...},
     "heads": {task: head bundle path}, "split": ..., "n_images": ...}

Only the tasks of the given heads appear. Per-image lists are left out of the document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrayfm.models.heads import head_pool
from xrayfm.models.runtime import module_device, resolve_device
from xrayfm.tasks.data import LabeledImage, images_tensor, lake_items, load_labeled_images, resize_item
from xrayfm.tasks.detect import DetectTask
from xrayfm.tasks.features import backbone_features
from xrayfm.tasks.train import load_head_bundle, predict_items, task_for_head
from xrayfm.tasks.tta import tta_elements

SECTION = {"classify": "classification", "segment": "segmentation",
           "segment_vertebrae": "vertebrae_segmentation", "detect": "detection"}


def _load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    from xrayfm.models.card import load_backbone

    return load_backbone(str(path))


@torch.no_grad()
def pooled_features(backbone: nn.Module, items: Sequence[LabeledImage], img_size: int,
                    batch_size: int = 64, progress: Callable[[int], None] | None = None,
                    pool: str = "final") -> torch.Tensor:
    """Pooled embeddings ``(N, D)`` float32 of items resized to ``img_size`` (``pool``:
    ``Backbone.forward_pooled``)."""
    backbone.eval()
    device = module_device(backbone)
    out = []
    for i in range(0, len(items), batch_size):
        chunk = [resize_item(it, img_size) for it in items[i:i + batch_size]]
        out.append(backbone_features(backbone, images_tensor(chunk).to(device), "pooled", pool).float().cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "embed_dim", 0))


def knn_monitor(lake: str, labels: str | Path, img_size: int, bank_split: str = "train",
                query_split: str = "val") -> Callable[[nn.Module], dict[str, float]]:
    """:func:`knn_region_monitor` on the lake's ``bank_split`` and ``query_split`` labelled images."""
    bank, _ = load_labeled_images(lake, str(labels), bank_split)
    query, _ = load_labeled_images(lake, str(labels), query_split)
    if not bank or not query:
        raise ValueError(f"kNN monitor: {labels} labels {len(bank)} {bank_split} and {len(query)} {query_split} "
                         f"images of {lake}; both must be > 0 (ingest the labelled images into this lake)")
    return knn_region_monitor(bank, query, img_size)


def knn_region_monitor(bank: Sequence[LabeledImage], query: Sequence[LabeledImage],
                       img_size: int) -> Callable[[nn.Module], dict[str, float]]:
    """A pretraining monitor: weighted kNN (k=20, T=0.07) body-region accuracy and balanced
    accuracy (mean recall over the classes the queries hold) of the ``query`` images against a
    ``bank`` memory bank."""
    from xrayfm.tasks.classify import knn_scores
    from xrayfm.tasks.metrics import balanced_accuracy, classification_metrics

    y_bank = torch.tensor([it.region_index for it in bank])
    y_query = np.array([it.region_index for it in query])
    n_classes = int(max(y_bank.max().item(), y_query.max())) + 1

    def monitor(backbone: nn.Module) -> dict[str, float]:
        scores = knn_scores(pooled_features(backbone, bank, img_size), y_bank,
                            pooled_features(backbone, query, img_size), n_classes)
        m = classification_metrics(y_query, scores.numpy(), n_classes)
        balanced = balanced_accuracy(np.asarray(m["confusion_matrix"]))
        return {"knn_accuracy": round(m["accuracy"], 4), "knn_balanced_accuracy": round(balanced, 4)}

    return monitor


def classification_baselines(backbone: nn.Module, train: Sequence[LabeledImage], test: Sequence[LabeledImage],
                             num_classes: int, img_size: int, classical: bool = False,
                             pool: str = "final") -> dict[str, Any]:
    """Weighted kNN (k=20, T=0.07) on the backbone's pooled embedding ``pool`` (the one the region
    head reads); optionally PCA+SVM on those features and on raw 32×32 thumbnails (the
    no-deep-learning reference)."""
    from xrayfm.tasks.classify import classical_scores, knn_scores
    from xrayfm.tasks.metrics import classification_metrics

    def summary(scores: np.ndarray) -> dict[str, float]:
        m = classification_metrics([it.region_index for it in test], scores, num_classes)
        return {k: m[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "top3_accuracy")}

    ftr, fte = (pooled_features(backbone, s, img_size, pool=pool) for s in (train, test))
    ytr = torch.tensor([it.region_index for it in train])
    out: dict[str, Any] = {"knn": summary(knn_scores(ftr, ytr, fte, num_classes).numpy())}
    if classical:
        out["pca_svm_features"] = summary(classical_scores(ftr.numpy(), ytr.numpy(), fte.numpy(), num_classes))
        thumbs = [np.stack([resize_item(it, 32).image.ravel() for it in s]) for s in (train, test)]
        out["pca_svm_pixels"] = summary(classical_scores(thumbs[0], ytr.numpy(), thumbs[1], num_classes))
    return out


def _strip_lists(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not k.endswith("_per_image")}


def evaluate_heads(backbone_path: str | Path, head_paths: Sequence[str | Path], items: Sequence[LabeledImage],
                   train_items: Sequence[LabeledImage] | None = None, classical: bool = False,
                   progress: Callable[[int], None] | None = None, device: str = "auto",
                   match_px: float | None = None, tta: str = "none") -> dict[str, Any]:
    """Metrics of each head bundle on ``items`` (models on ``device``, :func:`resolve_device`);
    ``train_items`` adds kNN/classical baselines; ``match_px`` replaces the screw matching radius
    (:class:`~xrayfm.tasks.detect.DetectTask` ``max_dist``, image px); ``tta``: test-time
    augmentation of the heads (:mod:`xrayfm.tasks.tta`; the baselines see the plain images)."""
    tta_elements(tta)
    if match_px is not None and not match_px > 0:
        raise ValueError(f"screw matching radius must be a positive distance in image pixels, got {match_px}; "
                         "pass e.g. --match-px 10")
    dev = resolve_device(device)
    backbone, card = _load_backbone(backbone_path)
    backbone.to(dev)
    doc: dict[str, Any] = {
        "backbone": {"arch": card.get("arch"), "method": card.get("method"), "checkpoint": str(backbone_path)},
        "heads": {}, "n_images": len(items), "tta": tta,
    }
    for hp in head_paths:
        head, hcard = load_head_bundle(hp)
        if hcard["backbone"].get("arch") not in (None, card.get("arch")):
            raise ValueError(f"head {hp} was trained on {hcard['backbone']['arch']}, not {card.get('arch')}; "
                             "pass the matching --backbone")
        bb = backbone
        if hcard.get("fine_tuned_backbone"):
            bb, _ = _load_backbone(Path(hp) / hcard["fine_tuned_backbone"])
            bb.to(dev)
        task = task_for_head(hcard)
        if match_px is not None and isinstance(task, DetectTask):
            task.max_dist = match_px
        section = SECTION[task.name]
        if section in doc:
            raise ValueError(f"two heads for task {task.name}; evaluate one head per task at a time")
        labelled = [it for it in items if task.has_label(it)]
        if not labelled:
            raise ValueError(f"no images of this split carry a {task.name} label; check --labels and --split")
        preds = predict_items(bb, head, task, labelled, int(hcard["img_size"]), progress=progress, tta=tta)
        metrics = _strip_lists(task.metrics(preds, labelled))
        metrics.update(task.operating_point())
        if task.name == "classify" and train_items:
            tr = [it for it in train_items if task.has_label(it)]
            metrics["baselines"] = classification_baselines(bb, tr, labelled, task.num_classes or 0,
                                                            int(hcard["img_size"]), classical, head_pool(head))
            metrics["knn_accuracy"] = metrics["baselines"]["knn"]["accuracy"]
        doc[section] = metrics
        doc["heads"][task.name] = str(hp)
    return doc


def embed_lake(backbone_path: str | Path, lake: str, out: str | Path, where: str | None = None,
               img_size: int | None = None, batch_size: int = 64, chunk: int = 512,
               progress: Callable[[int], None] | None = None) -> int:
    """Pooled embeddings of the lake images matching ``where`` into a parquet file.

    Columns: ``image_id`` (str), ``split`` (str), ``embedding`` (fixed-size list of float32);
    schema metadata ``xrayfm`` holds the backbone arch, method, checkpoint and image size.
    Returns the number of rows written.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from xrayfm.config import atomic_write_bytes
    from xrayfm.lake import read_rows

    backbone, card = _load_backbone(backbone_path)
    size = int(img_size or card.get("input_size") or 224)
    ids = read_rows(lake, where=where, columns=["image_id"]).column("image_id").to_pylist()
    if not ids:
        raise ValueError(f"no lake images match {where or 'the lake'}; check --split / --where")
    rows: dict[str, list[Any]] = {"image_id": [], "split": [], "embedding": []}
    for i in range(0, len(ids), chunk):
        quoted = ", ".join("'" + x.replace("'", "''") + "'" for x in ids[i:i + chunk])
        items = lake_items(lake, where=f"image_id IN ({quoted})")
        emb = pooled_features(backbone, items, size, batch_size, progress)
        rows["image_id"] += [it.image_id for it in items]
        rows["split"] += [it.split for it in items]
        rows["embedding"] += list(emb.numpy().astype(np.float32))
    dim = int(rows["embedding"][0].shape[0])
    meta = {"arch": card.get("arch"), "method": card.get("method"), "checkpoint": str(backbone_path),
            "img_size": size, "embed_dim": dim}
    schema = pa.schema([("image_id", pa.string()), ("split", pa.string()),
                        ("embedding", pa.list_(pa.float32(), dim))], metadata={"xrayfm": json.dumps(meta)})
    table = pa.table({"image_id": rows["image_id"], "split": rows["split"],
                      "embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.concatenate(rows["embedding"]), pa.float32()), dim)}, schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(out, buf.getvalue().to_pybytes())
    return len(rows["image_id"])
