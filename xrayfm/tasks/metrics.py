"""Metrics for the three head tasks, in numpy/scipy, with every edge case defined.

Classification
    ``y_true``/``y_pred`` are integer class indices. Macro precision/recall/F1 average the
    per-class values over the classes that occur in ``y_true`` or ``y_pred`` (a class that never
    occurs in either says nothing). A ratio whose denominator is 0 (a class never predicted, so
    precision is undefined) counts as 0. Per-class F1 is ``2PR/(P+R)`` (0 when ``P+R = 0``);
    macro F1 is the mean of per-class F1, not the F1 of macro P and R.

Segmentation
    Dice ``2|P∩T|/(|P|+|T|)`` and IoU ``|P∩T|/|P∪T|`` per image; both are 1 when prediction and
    truth are both empty (nothing to find, nothing claimed). Means are over images.
    Boundary-band Dice is Dice restricted to the pixels within ``k`` px (Euclidean, centre to
    centre) of the true boundary, on either side of it; an image without true foreground has no
    boundary and scores like plain Dice on an empty truth (1 if the prediction is empty, else 0).

Detection (screws)
    A screw is a directed segment ``head -> tip`` (points ``(x, y)``, xrayfm.conventions). The
    distance between a predicted and a true screw is the mean of the head distance and the tip
    distance (head and tip are distinct: no orientation swap). Per image, predictions and truths
    are matched one-to-one by the Hungarian algorithm (scipy ``linear_sum_assignment``) with
    pairs farther than ``max_dist`` forbidden: the matching has the most pairs possible, and
    among those the least total distance. Precision = TP / predictions, recall = TP / truths;
    with no predictions precision is 1 if there are no truths either, else 0; with no truths
    recall is 1. Precision, recall and the errors count predictions scoring at least
    ``score_threshold`` (the operating point); AP ranks all predictions of all images by score; at each rank the TP count is
    that of the Hungarian matching of each image's predictions up to that rank; AP is the area
    under the precision envelope (all-point interpolation). Errors (px, and mm where the pixel
    spacing is known) are means over matched pairs; the angle error is the directed difference
    of ``atan2(tip - head)`` wrapped to [0, 180] degrees and skips true screws that are end-on
    (flag set, or projected length below ``min_angle_length``). Undefined means are ``None``.
    Because one reversed screw (head and tip swapped, possible on screws shorter than
    ``max_dist``) adds 180 degrees, the angle errors also come as a median and as the fraction of
    matches pointing the wrong way (error above 90 degrees).

Over repeated runs
    :func:`mean_over_runs` reduces several metric dicts of one setting (e.g. label draws) to the
    mean of every numeric leaf over the runs where it is defined (``None``/NaN skipped), and the
    sample standard deviation (``ddof=1``) of the top-level numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from xrayfm.conventions import direction_deg

Spacing = float | tuple[float, float] | None


# ---------------------------------------------------------------- classification


def _as_labels(y: Any, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name}: expected a 1-D array of integer class indices, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of samples with true class ``i`` predicted as ``j`` (int64)."""
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}; pass one prediction per sample")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}); got values outside it")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def precision_recall_f1(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 from a confusion matrix, plus the mask of classes present."""
    tp = np.diag(cm).astype(np.float64)
    pred_n, true_n = cm.sum(axis=0).astype(np.float64), cm.sum(axis=1).astype(np.float64)
    prec, rec = _safe_div(tp, pred_n), _safe_div(tp, true_n)
    f1 = _safe_div(2 * prec * rec, prec + rec)
    return {"precision": prec, "recall": rec, "f1": f1, "present": (pred_n + true_n) > 0}


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that occur in the truth (rows of ``cm`` with any sample); a
    class that is only predicted does not count, unlike ``recall_macro``."""
    cm = np.asarray(cm, dtype=np.float64)
    held = cm.sum(axis=1) > 0
    return float((np.diag(cm)[held] / cm.sum(axis=1)[held]).mean()) if held.any() else float("nan")


def top_k_accuracy(y_true: Any, scores: Any, k: int = 3) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores (ties: lower index)."""
    t = _as_labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != t.size:
        raise ValueError(f"scores must have shape (N={t.size}, num_classes), got {s.shape}")
    if t.size == 0:
        return float("nan")
    top = np.argsort(-s, axis=1, kind="stable")[:, : min(k, s.shape[1])]
    return float(np.mean(np.any(top == t[:, None], axis=1)))


def classification_metrics(y_true: Any, scores: Any, num_classes: int | None = None) -> dict[str, Any]:
    """Accuracy, macro P/R/F1, top-3 accuracy and confusion matrix from class scores (N, K)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D (N, num_classes) array, got shape {s.shape}")
    k = num_classes or s.shape[1]
    t = _as_labels(y_true, "y_true")
    pred = s.argmax(axis=1) if s.size else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(t, pred, k)
    prf = precision_recall_f1(cm)
    present = prf["present"]
    macro = {m: float(prf[m][present].mean()) if present.any() else float("nan") for m in ("precision", "recall", "f1")}
    return {
        "accuracy": float(np.mean(pred == t)) if t.size else float("nan"),
        "precision_macro": macro["precision"],
        "recall_macro": macro["recall"],
        "f1_macro": macro["f1"],
        "top3_accuracy": top_k_accuracy(t, s, 3),
        "confusion_matrix": cm.tolist(),
        "n": int(t.size),
    }


# ---------------------------------------------------------------- segmentation


def _pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction mask shape {p.shape} differs from truth {t.shape}; resize to the truth")
    return p, t


def dice(pred: Any, true: Any) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, t = _pair(pred, true)
    den = int(p.sum()) + int(t.sum())
    return 1.0 if den == 0 else 2.0 * int(np.logical_and(p, t).sum()) / den


def iou(pred: Any, true: Any) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    p, t = _pair(pred, true)
    union = int(np.logical_or(p, t).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union


def boundary_band(mask: Any, k: float) -> np.ndarray:
    """Pixels within ``k`` px of the mask boundary: foreground pixels within ``k`` of a background
    pixel and background pixels within ``k`` of a foreground pixel (image edges are not boundary)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any() or m.all():
        return np.zeros_like(m)
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    return (m & (inside <= k)) | (~m & (outside <= k))


def boundary_dice(pred: Any, true: Any, k: float = 2.0) -> float:
    """Dice restricted to the band of ``k`` px around the true boundary."""
    p, t = _pair(pred, true)
    if not t.any():
        return dice(p, t)
    band = boundary_band(t, k)
    return dice(p[band], t[band])


def segmentation_metrics(preds: Sequence[Any], trues: Sequence[Any], boundary_k: float | None = 2.0) -> dict[str, Any]:
    """Per-image Dice/IoU (and boundary Dice) and their means over images.

    ``dice_mean`` counts an image with an empty true and predicted mask as 1, so a head that
    predicts nothing scores the share of empty images; ``dice_positive_mean`` (images whose true
    mask is non-empty; NaN when there are none) and ``empty_fp_rate`` (empty images with any
    predicted pixel) separate the two halves of that number.
    """
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} predicted masks but {len(trues)} true masks; pass one per image")
    d = [dice(p, t) for p, t in zip(preds, trues)]
    j = [iou(p, t) for p, t in zip(preds, trues)]
    positive = [bool(np.asarray(t).any()) for t in trues]
    d_pos = [v for v, pos in zip(d, positive) if pos]
    fp = [bool(np.asarray(p).any()) for p, pos in zip(preds, positive) if not pos]
    out: dict[str, Any] = {
        "dice_mean": float(np.mean(d)) if d else float("nan"),
        "iou_mean": float(np.mean(j)) if j else float("nan"),
        "dice_positive_mean": float(np.mean(d_pos)) if d_pos else float("nan"),
        "empty_fp_rate": float(np.mean(fp)) if fp else float("nan"),
        "dice_per_image": d,
        "iou_per_image": j,
        "n": len(d),
        "n_positive": len(d_pos),
    }
    if boundary_k is not None:
        b = [boundary_dice(p, t, boundary_k) for p, t in zip(preds, trues)]
        out["boundary_dice_mean"] = float(np.mean(b)) if b else float("nan")
        out["boundary_k_px"] = boundary_k
    return out


# ---------------------------------------------------------------- detection


def _points(screws: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray([s[key] for s in screws], dtype=np.float64).reshape(-1, 2)


def screw_distances(preds: Sequence[dict[str, Any]], trues: Sequence[dict[str, Any]]) -> np.ndarray:
    """(P, T) matrix of mean(head distance, tip distance) in px."""
    ph, pt, th, tt = (_points(preds, "head"), _points(preds, "tip"), _points(trues, "head"), _points(trues, "tip"))
    dh = np.linalg.norm(ph[:, None] - th[None], axis=-1)
    dt = np.linalg.norm(pt[:, None] - tt[None], axis=-1)
    return (dh + dt) / 2.0


def match_screws(preds: Sequence[dict[str, Any]], trues: Sequence[dict[str, Any]],
                 max_dist: float) -> list[tuple[int, int, float]]:
    """Hungarian matching with pairs beyond ``max_dist`` forbidden: ``[(pred_i, true_j, dist)]``."""
    if not preds or not trues:
        return []
    dist = screw_distances(preds, trues)
    allowed = dist <= max_dist
    # A forbidden pair costs more than any full set of allowed pairs, so the assignment first
    # maximises the number of allowed pairs, then minimises their total distance.
    big = max_dist * (min(dist.shape) + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(allowed, dist, big))
    return [(int(r), int(c), float(dist[r, c])) for r, c in zip(rows, cols) if allowed[r, c]]


def _spacing_rc(spacing: Spacing) -> tuple[float, float] | None:
    if spacing is None:
        return None
    if isinstance(spacing, (int, float)):
        return float(spacing), float(spacing)
    r, c = spacing
    return float(r), float(c)


def angle_difference(a_deg: float, b_deg: float) -> float:
    """Directed angle difference wrapped to [0, 180] degrees."""
    return float(abs((a_deg - b_deg + 180.0) % 360.0 - 180.0))


def average_precision(tp_increments: np.ndarray, n_true: int) -> float:
    """All-point interpolated AP from per-rank TP increments (0/1) of score-ranked predictions."""
    if n_true == 0:
        return 1.0 if tp_increments.size == 0 else 0.0
    if tp_increments.size == 0:
        return 0.0
    tp = np.cumsum(tp_increments)
    precision = tp / np.arange(1, tp.size + 1)
    recall = tp / n_true
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    prev_recall = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - prev_recall) * envelope))


def _image_tp_curve(preds: Sequence[dict[str, Any]], trues: Sequence[dict[str, Any]],
                    order: np.ndarray, max_dist: float) -> np.ndarray:
    """TP count of the matching of the top-i predictions, i = 1..P, minus the count at i-1."""
    counts = [len(match_screws([preds[j] for j in order[: i + 1]], trues, max_dist)) for i in range(len(order))]
    return np.diff(np.concatenate([[0], counts])).astype(np.float64)


def ranked_tp_increments(preds: Sequence[Sequence[dict[str, Any]]], trues: Sequence[Sequence[dict[str, Any]]],
                         max_dist: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of all predictions of all images, best first, and the TP increment at each rank: the
    TPs of the predictions scoring ``>= scores[i]`` are ``increments[: i + 1].sum()`` (ties aside)."""
    ranked: list[tuple[float, float]] = []
    for p, t in zip(preds, trues):
        scores = np.asarray([float(s["score"]) for s in p])
        order = np.argsort(-scores, kind="stable")
        ranked += list(zip(scores[order], _image_tp_curve(p, t, order, max_dist)))
    ranked.sort(key=lambda r: -r[0])
    return (np.asarray([r[0] for r in ranked], dtype=np.float64),
            np.asarray([r[1] for r in ranked], dtype=np.float64))


def drop_ignored(preds: Sequence[Sequence[dict[str, Any]]], trues: Sequence[Sequence[dict[str, Any]]],
                 max_dist: float = 10.0) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """Per image, the truths not flagged ``ignore`` and the predictions minus those explained by
    an ignored truth: predictions are matched to the scored truths first, and of the rest those
    a Hungarian match puts on an ignored truth are dropped (COCO's crowd / KITTI's DontCare)."""
    kept_p: list[list[dict[str, Any]]] = []
    kept_t: list[list[dict[str, Any]]] = []
    for p, t in zip(preds, trues):
        scored = [s for s in t if not s.get("ignore", False)]
        ignored = [s for s in t if s.get("ignore", False)]
        rest = list(p)
        if ignored:
            hit = {pi for pi, _, _ in match_screws(p, scored, max_dist)}
            rest_idx = [i for i in range(len(p)) if i not in hit]
            explained = {rest_idx[pi] for pi, _, _ in match_screws([p[i] for i in rest_idx], ignored, max_dist)}
            rest = [s for i, s in enumerate(p) if i not in explained]
        kept_p.append(rest)
        kept_t.append(scored)
    return kept_p, kept_t


def f1_operating_point(preds: Sequence[Sequence[dict[str, Any]]], trues: Sequence[Sequence[dict[str, Any]]],
                       max_dist: float = 10.0, current: float | None = None) -> dict[str, float] | None:
    """The score threshold with the highest F1 of matched screws, with its precision and recall
    (and, given a ``current`` threshold, the F1 there as ``f1_at_current``, from the same ranking).

    The threshold lies halfway between the last kept score and the next lower one, so it does not
    sit on a score of the data it was chosen on. None when there are no predictions or no truths.
    Truths flagged ``ignore`` count neither way (:func:`drop_ignored`).
    """
    preds, trues = drop_ignored(preds, trues, max_dist)
    scores, incr = ranked_tp_increments(preds, trues, max_dist)
    n_true = sum(len(t) for t in trues)
    if not len(scores) or n_true == 0:
        return None
    tp = np.cumsum(incr)
    kept = np.arange(1, len(scores) + 1)
    last = np.r_[scores[1:] < scores[:-1], True]  # end of a group of tied scores
    prec, rec = tp / kept, tp / n_true
    f1 = np.where(tp > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    i = int(np.argmax(np.where(last, f1, -1.0)))
    thr = float((scores[i] + scores[i + 1]) / 2) if i + 1 < len(scores) else float(scores[i])
    out = {"threshold": thr, "f1": float(f1[i]), "precision": float(prec[i]), "recall": float(rec[i])}
    if current is not None:
        n_kept = int((scores >= current).sum())  # scores are sorted, ties all kept
        out["f1_at_current"] = float(f1[n_kept - 1]) if n_kept else 0.0
    return out


def detection_metrics(preds: Sequence[Sequence[dict[str, Any]]], trues: Sequence[Sequence[dict[str, Any]]],
                      max_dist: float = 10.0, spacings: Sequence[Spacing] | None = None,
                      min_angle_length: float = 5.0, score_threshold: float = 0.0) -> dict[str, Any]:
    """Screw detection metrics over images. Predictions need ``head``, ``tip``, ``score``; truths
    need ``head``, ``tip`` and may carry ``end_on`` and ``ignore`` (truncated screws: neither
    missed when not found nor false when found, :func:`drop_ignored`). ``spacings`` (mm, per
    image) adds mm errors. AP ranks all predictions; precision, recall and errors use those scoring
    ``>= score_threshold`` (the operating point)."""
    if len(preds) != len(trues):
        raise ValueError(f"{len(preds)} prediction lists but {len(trues)} truth lists; pass one per image")
    if spacings is not None and len(spacings) != len(trues):
        raise ValueError(f"{len(spacings)} pixel spacings for {len(trues)} images; pass one per image (None if unknown)")
    n_ignored = sum(bool(s.get("ignore", False)) for t in trues for s in t)
    preds, trues = drop_ignored(preds, trues, max_dist)
    n_pred = sum(1 for p in preds for s in p if float(s["score"]) >= score_threshold)
    n_true = sum(len(t) for t in trues)
    head_px: list[float] = []
    tip_px: list[float] = []
    ang: list[float] = []
    ang_len: list[float] = []  # true length of each screw in ``ang``
    head_mm: list[float] = []
    tip_mm: list[float] = []
    _, incr = ranked_tp_increments(preds, trues, max_dist)
    tp = 0
    lengths: list[float] = []  # of every true screw, and whether it was found
    found: list[bool] = []
    missed_near = 0  # missed true screws with a kept prediction's head or tip within max_dist of an end
    superimposed: list[bool] = []  # per true screw: another one lies on it (superimposed_screws)
    for i, (p, t) in enumerate(zip(preds, trues)):
        sp = _spacing_rc(spacings[i]) if spacings is not None else None
        p = [s for s in p if float(s["score"]) >= score_threshold]
        matches = match_screws(p, t, max_dist)
        hit = {ti for _, ti, _ in matches}
        lengths += [float(np.linalg.norm(np.subtract(s["tip"], s["head"]))) for s in t]
        found += [j in hit for j in range(len(t))]
        superimposed += superimposed_screws(t, max_dist)
        ends = np.asarray([s[k] for s in p for k in ("head", "tip")], float).reshape(-1, 2)
        for j in set(range(len(t))) - hit:
            te = np.asarray([t[j]["head"], t[j]["tip"]], float)
            missed_near += bool(len(ends)) and bool((np.linalg.norm(ends[:, None] - te[None], axis=-1) <= max_dist).any())
        for pi, ti, _ in matches:
            tp += 1
            ph, pt = np.asarray(p[pi]["head"], float), np.asarray(p[pi]["tip"], float)
            th, tt = np.asarray(t[ti]["head"], float), np.asarray(t[ti]["tip"], float)
            head_px.append(float(np.linalg.norm(ph - th)))
            tip_px.append(float(np.linalg.norm(pt - tt)))
            if sp is not None:
                scale = np.asarray([sp[1], sp[0]])  # x along columns, y along rows
                head_mm.append(float(np.linalg.norm((ph - th) * scale)))
                tip_mm.append(float(np.linalg.norm((pt - tt) * scale)))
            length = float(np.linalg.norm(tt - th))
            if not t[ti].get("end_on", False) and length >= min_angle_length:
                ang.append(angle_difference(direction_deg(ph, pt), direction_deg(th, tt)))
                ang_len.append(length)

    def mean(v: list[float]) -> float | None:
        return float(np.mean(v)) if v else None

    def median(v: list[float]) -> float | None:
        return float(np.median(v)) if v else None

    return {
        "precision": tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0),
        "recall": tp / n_true if n_true else 1.0,
        "ap": average_precision(incr, n_true),
        "head_error_px": mean(head_px),
        "tip_error_px": mean(tip_px),
        "angle_error_deg": mean(ang),
        "angle_error_median_deg": median(ang),
        "reversed_rate": float(np.mean(np.asarray(ang) > REVERSED_DEG)) if ang else None,
        "head_error_mm": mean(head_mm),
        "tip_error_mm": mean(tip_mm),
        "n_pred": n_pred,
        "n_true": n_true,
        "n_ignored": n_ignored,
        "n_matched": tp,
        "max_dist_px": max_dist,
        "score_threshold": score_threshold,
        "recall_by_length_px": _recall_by_length(np.asarray(lengths), np.asarray(found, dtype=bool)),
        "angle_by_length_px": _angle_by_length(np.asarray(ang_len), np.asarray(ang)),
        "missed_near": missed_near,
        "superimposed": _recall_of(np.asarray(found, dtype=bool), np.asarray(superimposed, dtype=bool)),
    }


def superimposed_screws(screws: Sequence[dict[str, Any]], max_dist: float) -> list[bool]:
    """Per screw of one image: does another one lie within ``max_dist`` of it
    (:func:`screw_distances`), so that one prediction at the matching distance can match either?
    The left and right pedicle screws of a vertebra do on a lateral view."""
    if len(screws) < 2:
        return [False] * len(screws)
    d = screw_distances(screws, screws)
    np.fill_diagonal(d, np.inf)
    return [bool(v) for v in (d <= max_dist).any(axis=1)]


def _recall_of(found: np.ndarray, inside: np.ndarray) -> dict[str, Any]:
    """``{"n", "recall"}`` of the true screws selected by ``inside`` (recall None when there are none)."""
    return {"n": int(inside.sum()), "recall": float(found[inside].mean()) if inside.any() else None}


LENGTH_BINS_PX = (0.0, 10.0, 20.0, 40.0, float("inf"))
REVERSED_DEG = 90.0  # a matched screw whose angle error exceeds this points head <-> tip


def _length_bins(lengths: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``(name, in-bin mask)`` for each bin of :data:`LENGTH_BINS_PX`: "0-10", ..., "40+"."""
    return [(f"{lo:g}-{hi:g}" if np.isfinite(hi) else f"{lo:g}+", (lengths >= lo) & (lengths < hi))
            for lo, hi in pairwise(LENGTH_BINS_PX)]


def _recall_by_length(lengths: np.ndarray, found: np.ndarray) -> dict[str, dict[str, Any]]:
    """Recall of the true screws in each head-tip length bin of :data:`LENGTH_BINS_PX` (px):
    ``{"0-10": {"n": ..., "recall": ... or None}, ..., "40+": ...}``."""
    return {name: _recall_of(found, inside) for name, inside in _length_bins(lengths)}


def _angle_by_length(lengths: np.ndarray, errors: np.ndarray) -> dict[str, dict[str, Any]]:
    """Angle errors (degrees) of the matched screws that have one, by their true length bin:
    ``{"0-10": {"n", "mean_deg", "median_deg", "reversed_rate"}, ...}`` (None where a bin is empty).
    Short projections carry most of the reversals and the spread of the mean."""
    out: dict[str, dict[str, Any]] = {}
    for name, inside in _length_bins(lengths):
        e = errors[inside]
        stats = {"mean_deg": float(e.mean()), "median_deg": float(np.median(e)),
                 "reversed_rate": float((e > REVERSED_DEG).mean())} if len(e) else \
            dict.fromkeys(("mean_deg", "median_deg", "reversed_rate"))
        out[name] = {"n": len(e), **stats}
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _mean_leaves(values: Sequence[Any]) -> Any:
    if any(isinstance(v, dict) for v in values):
        dicts = [v for v in values if isinstance(v, dict)]
        return {k: _mean_leaves([d.get(k) for d in dicts]) for k in dicts[0]}
    nums = [float(v) for v in values if _number(v)]
    if nums:
        return float(np.mean(nums))
    return next((v for v in values if v is not None), None)


def mean_over_runs(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """``(mean, std)`` of metric dicts from repeated runs of one setting.

    ``mean`` has the keys of the first run; numeric leaves (nested dicts included) are averaged
    over the runs where they are a finite number, other leaves keep the first defined value, and
    a leaf undefined in every run stays ``None``. ``std`` holds the sample standard deviation of
    each top-level number over the runs that define it (``None`` with fewer than two)."""
    if not runs:
        raise ValueError("mean_over_runs needs at least one run")
    mean = {k: _mean_leaves([r.get(k) for r in runs]) for k in runs[0]}
    std: dict[str, float | None] = {}
    for k in runs[0]:
        nums = [float(r[k]) for r in runs if _number(r.get(k))]
        if nums or all(r.get(k) is None for r in runs):
            std[k] = float(np.std(nums, ddof=1)) if len(nums) >= 2 else None
    return mean, std
