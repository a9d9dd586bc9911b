"""Screw detection from keypoints: targets, loss and decoding for the ``screw_keypoints`` head.

A screw is the directed segment ``head -> tip``. On the head's stride-``s`` grid (4 by default),
the cell holding the head (``(i, j) = floor(y / s), floor(x / s)``) carries its sub-cell offset
``head / s - (j + 0.5, i + 0.5)``, the vector ``(tip - head) / s`` and the box margin (how far
the label box reaches beyond the head-tip extent, in stride units); the cell holding the tip
carries the tip's offset and the vector ``(head - tip) / s``. Heatmap targets are Gaussians
(sigma 1 cell) that are exactly 1 at those cells. An end that cannot be seen (outside the image, behind a
collimator blade, outside the image-intensifier circle) gets neither; such truncated screws are
``ignore`` in the metrics (:func:`truths`).

Screws that lie on one another (mean head and tip distance within :data:`SUPERIMPOSED_CELLS`
cells: the left and right pedicle screws of a vertebra on a lateral view) share their peaks; a
head built with ``superimposed`` has a third heatmap, 1 at the head cell of each such screw.

Decoding: 3×3 local maxima above ``threshold`` in each heatmap are head and tip candidates.
Each head predicts where its tip is and each tip where its head is; heads and tips are paired
one-to-one by the Hungarian algorithm on the mean of the two prediction errors, gated at
``max(3 s, 0.3 × predicted length)``. A pair's score is the geometric mean of the two peak
probabilities; an unpaired head (or tip) keeps the point it predicts for its partner and scores
``peak ** 0.85 * partner ** 0.15``, partner = the other heatmap at that point
(:data:`PARTNER_WEIGHT`). Each screw has ``score``, ``head``, ``tip``, ``box``, ``angle_deg``
(head -> tip, conventions) and ``length_px``. Where the superimposed heatmap ``q`` (at a screw's
head cell) says a second screw lies on a decoded one and no other decoded screw
scoring at least ``q`` is within :data:`SUPERIMPOSED_CELLS`, a copy of it scoring ``q`` (and
``superimposed: True``) is added. Endpoints
are local features, so crossing screws and screws sharing a midpoint stay separate; two heads in
one stride cell merge (the later label wins the cell).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from xrayfm.conventions import direction_deg
from xrayfm.models.heads import N_HEATMAPS, N_REGRESSIONS, SUPERIMPOSED_CHANNEL
from xrayfm.tasks.base import HeadTask, register_task
from xrayfm.tasks.data import LabeledImage, endpoint_visible, scale_screw, screw_detectable
from xrayfm.tasks.metrics import detection_metrics, f1_operating_point, screw_distances, superimposed_screws

STRIDE = 4  # the screw_keypoints head's default grid stride
CANDIDATE_THRESHOLD = 0.05  # lowest heatmap peak that competes in the head-tip pairing
# An unpaired end scores ``peak ** (1 - w) * partner ** w``, partner = the other heatmap where the
# end says its partner is. w 0.5 (the geometric mean, as for pairs) ranked correct screws with a
# faint far end below false pairs; w = 0.15 was chosen on the val split ("Scoring an unpaired end").
PARTNER_WEIGHT = 0.15
# Two screws closer than this (mean head and tip distance, grid cells) share their peaks: 2.5 cells
# is the 10-px matching radius of the 128-px benchmark at stride 4, within which 29 % of its test
# screws have a twin (docs/heads-experiments.md "Superimposed screws").
SUPERIMPOSED_CELLS = 2.5
# Regression channels (after the 2 heatmaps) owned by the head cell and by the tip cell.
HEAD_REG = [0, 1, 4, 5, 8]   # head offset x/y, head->tip x/y, box margin
TIP_REG = [2, 3, 6, 7]       # tip offset x/y, tip->head x/y


def _box_margin(s: dict[str, Any]) -> float:
    if s.get("box") is None:
        return 0.0
    (hx, hy), (tx, ty) = s["head"], s["tip"]
    x0, y0, x1, y1 = s["box"]
    return float(np.mean([min(hx, tx) - x0, min(hy, ty) - y0, x1 - max(hx, tx), y1 - max(hy, ty)]))


def encode_screws(screws: Sequence[dict[str, Any]], height: int, width: int,
                  stride: int = STRIDE, superimposed: bool = False) -> dict[str, Tensor]:
    """Targets for one image: ``heat (2, h, w)`` (3 with ``superimposed``), ``reg (9, h, w)``,
    ``reg_mask (9, h, w)``. Only visible ends (:func:`~xrayfm.tasks.data.endpoint_visible`) get
    a peak and their cell's regressions; a visible end still points at its hidden partner."""
    h, w = math.ceil(height / stride), math.ceil(width / stride)
    heat = torch.zeros(N_HEATMAPS + int(superimposed), h, w)
    reg = torch.zeros(N_REGRESSIONS, h, w)
    mask = torch.zeros(N_REGRESSIONS, h, w)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    twins: set[int] = set()  # ids of the screws with a visible head that lie on another such one
    if superimposed:
        visible = [s for s in screws if endpoint_visible(s, "head", height, width)]
        twins = {id(s) for s, on_another in zip(visible, superimposed_screws(visible, SUPERIMPOSED_CELLS * stride))
                 if on_another}
    for s in screws:
        head, tip = np.asarray(s["head"], np.float64), np.asarray(s["tip"], np.float64)
        v = (tip - head) / stride
        ends = (("head", head, HEAD_REG, [*v, _box_margin(s) / stride]), ("tip", tip, TIP_REG, [*(-v)]))
        for k, (end, p, chans, rest) in enumerate(ends):
            if not endpoint_visible(s, end, height, width):
                continue
            j, i = int(p[0] // stride), int(p[1] // stride)
            peak = torch.exp(-((xs - j) ** 2 + (ys - i) ** 2) / 2.0)
            heat[k] = torch.maximum(heat[k], peak)
            if end == "head" and id(s) in twins:
                heat[N_HEATMAPS] = torch.maximum(heat[N_HEATMAPS], peak)
            for ch, val in zip(chans, [*(p / stride - (j + 0.5, i + 0.5)), *rest]):
                reg[ch, i, j], mask[ch, i, j] = float(val), 1.0
    return {"heat": heat, "reg": reg, "reg_mask": mask}


def focal_heatmap_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel focal loss (CenterNet), normalised by the number of peaks."""
    logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logp.exp()
    pos = target.eq(1.0).float()
    pos_loss = (pos * (1 - p) ** alpha * logp).sum()
    neg_loss = ((1 - pos) * (1 - target) ** beta * p**alpha * log1mp).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


def detection_loss(out: Tensor, targets: dict[str, Tensor], vector_weight: float = 0.1) -> Tensor:
    """Focal loss on the heatmaps (head, tip and, when the head has it, superimposed: one loss
    normalised by all their peaks, so the rare superimposed peaks weigh as what they are) + L1 on
    offsets (weight 1) and vectors/margin (``vector_weight``)."""
    heat_logits = torch.cat([out[:, :N_HEATMAPS], out[:, SUPERIMPOSED_CHANNEL:]], dim=1)
    focal = focal_heatmap_loss(heat_logits, targets["heat"])
    m = targets["reg_mask"]
    weights = torch.full((N_REGRESSIONS,), vector_weight, device=out.device)
    weights[[0, 1, 2, 3]] = 1.0
    l1 = (out[:, N_HEATMAPS:SUPERIMPOSED_CHANNEL] - targets["reg"]).abs() * m * weights[None, :, None, None]
    return focal + l1.sum() / m[:, :1].sum().clamp(min=1.0) / 2


def _peaks(heat: Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    keep = (heat == F.max_pool2d(heat[None], 3, stride=1, padding=1)[0]) & (heat >= threshold)
    ii, jj = torch.nonzero(keep, as_tuple=True)
    return np.stack([ii.numpy(), jj.numpy()], 1), heat[ii, jj].numpy().astype(np.float64)


def _sample(heat: Tensor, p: np.ndarray, stride: int) -> float:
    j = int(np.clip(p[0] // stride, 0, heat.shape[1] - 1))
    i = int(np.clip(p[1] // stride, 0, heat.shape[0] - 1))
    return float(heat[i, j])


def _screw(head: np.ndarray, tip: np.ndarray, score: float, margin: float) -> dict[str, Any]:
    d = tip - head
    lo, hi = np.minimum(head, tip) - margin, np.maximum(head, tip) + margin
    return {"score": score, "head": head.tolist(), "tip": tip.tolist(), "box": [*lo.tolist(), *hi.tolist()],
            "angle_deg": direction_deg(head, tip), "length_px": float(np.hypot(*d))}


def _decode_one(out: Tensor, threshold: float, stride: int, partner_weight: float) -> list[dict[str, Any]]:
    heat = torch.sigmoid(out[:N_HEATMAPS].float())
    reg = out[N_HEATMAPS:SUPERIMPOSED_CHANNEL].double().numpy()
    (hc, hs), (tc, ts) = _peaks(heat[0], threshold), _peaks(heat[1], threshold)

    def at(cells: np.ndarray, chans: list[int]) -> np.ndarray:
        return reg[chans][:, cells[:, 0], cells[:, 1]].T if len(cells) else np.zeros((0, len(chans)))

    hp = (hc[:, ::-1] + 0.5 + at(hc, HEAD_REG[:2])) * stride     # head positions (x, y)
    tp = (tc[:, ::-1] + 0.5 + at(tc, TIP_REG[:2])) * stride
    h2t = hp + at(hc, HEAD_REG[2:4]) * stride                    # where each head puts its tip
    t2h = tp + at(tc, TIP_REG[2:4]) * stride
    margin = np.maximum(at(hc, HEAD_REG[4:]), 0.0)[:, 0] * stride
    screws: list[dict[str, Any]] = []
    paired_h: set[int] = set()
    paired_t: set[int] = set()
    if len(hp) and len(tp):
        cost = (np.linalg.norm(h2t[:, None] - tp[None], axis=-1) + np.linalg.norm(t2h[None] - hp[:, None], axis=-1)) / 2
        gate = np.maximum(3 * stride, 0.3 * np.linalg.norm(h2t - hp, axis=1))[:, None]
        big = float(cost.max() * (min(cost.shape) + 1) + 1)
        for a, b in zip(*linear_sum_assignment(np.where(cost <= gate, cost, big))):
            if cost[a, b] <= gate[a, 0]:
                screws.append(_screw(hp[a], tp[b], float(np.sqrt(hs[a] * ts[b])), margin[a]))
                paired_h.add(int(a))
                paired_t.add(int(b))
    w = partner_weight
    for a in set(range(len(hp))) - paired_h:
        score = float(hs[a] ** (1 - w) * _sample(heat[1], h2t[a], stride) ** w)
        if score >= threshold:
            screws.append(_screw(hp[a], h2t[a], score, margin[a]))
    for b in set(range(len(tp))) - paired_t:
        score = float(ts[b] ** (1 - w) * _sample(heat[0], t2h[b], stride) ** w)
        if score >= threshold:
            screws.append(_screw(t2h[b], tp[b], score, 0.0))
    if out.shape[0] > SUPERIMPOSED_CHANNEL:
        screws += _superimposed_copies(screws, torch.sigmoid(out[SUPERIMPOSED_CHANNEL].float()), threshold, stride)
    return sorted(screws, key=lambda s: -s["score"])


def _superimposed_copies(screws: list[dict[str, Any]], heat: Tensor, threshold: float,
                         stride: int) -> list[dict[str, Any]]:
    """A copy of each decoded screw that the superimposed heatmap says lies on a second one,
    unless another decoded screw at least as likely is already there; it scores the heatmap and
    carries ``superimposed: True``."""
    if not screws:
        return []
    near = screw_distances(screws, screws) <= SUPERIMPOSED_CELLS * stride
    np.fill_diagonal(near, False)  # a screw does not stand in for its own copy
    scores = np.asarray([s["score"] for s in screws])
    copies = []
    for k, s in enumerate(screws):
        q = _sample(heat, np.asarray(s["head"]), stride)
        if q >= threshold and not (near[k] & (scores >= q)).any():
            copies.append({**s, "score": q, "superimposed": True})
    return copies


@torch.no_grad()
def decode_screws(out: Tensor, threshold: float = 0.3, max_screws: int = 50, stride: int = STRIDE,
                  candidates: float = CANDIDATE_THRESHOLD,
                  partner_weight: float = PARTNER_WEIGHT) -> list[list[dict[str, Any]]]:
    """Head output ``(B, 12, h, w)`` (11 without the superimposed heatmap) -> per image, screws
    scoring ``>= threshold`` in input pixels, best score first. Peaks down to
    ``min(candidates, threshold)`` take part in the pairing, so a screw kept at one threshold is
    the same screw at any other: what ``evaluate`` measures at an operating point is what
    ``predict`` returns there."""
    floor = min(candidates, threshold)
    return [[s for s in _decode_one(o.cpu(), floor, stride, partner_weight) if s["score"] >= threshold][:max_screws]
            for o in out]


def screws_in_frames(out: Tensor, threshold: float, size: tuple[int, int],
                     frames: Sequence[tuple[int, int]]) -> list[list[dict[str, Any]]]:
    """:func:`decode_screws` of a ``size`` input, points and boxes mapped to each image's original
    ``(H, W)`` in ``frames`` (per axis) and the angle recomputed there. The grid stride is read
    off the output (``size / grid``), so decoding always matches the head that produced it."""
    stride = size[1] // out.shape[-1]
    if stride * out.shape[-1] != size[1] or stride * out.shape[-2] != size[0]:
        raise ValueError(f"detector output grid {tuple(out.shape[-2:])} does not divide the input size {size}; "
                         "use an input size that is a multiple of the head's stride")
    preds = []
    for screws, (h, w) in zip(decode_screws(out, threshold, stride=stride), frames):
        scaled = [scale_screw(s, w / size[1], h / size[0]) for s in screws]
        for s in scaled:
            s["angle_deg"] = direction_deg(s["head"], s["tip"])
        preds.append(scaled)
    return preds


def truths(items: Sequence[LabeledImage]) -> list[list[dict[str, Any]]]:
    """Each item's screws for the metrics, ``ignore`` set on those with a hidden end
    (:func:`~xrayfm.tasks.data.screw_detectable`)."""
    return [[{**s, "ignore": not screw_detectable(s, *it.size)} for s in it.screws or []] for it in items]


@register_task
class DetectTask(HeadTask):
    """Screws as head/tip keypoint pairs with a box and a confidence."""

    name = "detect"
    default_head = "screw_keypoints"
    input_kind = "dense"
    # stride 4 reading the input image: +2-3 points of AP on the 1,416-image lake (two seeds) and
    # on the 180-image demo lake (three seeds), for about twice the head's step (docs/heads-experiments.md
    # "Screws reading the image")
    default_image_skip = True

    def __init__(self, num_classes: int | None = None, threshold: float = 0.3, max_dist: float = 10.0,
                 ap_threshold: float = CANDIDATE_THRESHOLD) -> None:
        """``threshold``: operating point of precision/recall/errors; predictions are decoded down
        to ``ap_threshold`` so AP sees the low-confidence tail of the ranking."""
        super().__init__(num_classes)
        self.threshold = threshold
        self.max_dist = max_dist
        self.ap_threshold = min(ap_threshold, threshold)
        self.stride = STRIDE
        self.superimposed = True  # new heads get the heatmap; bind_head takes a trained head's own

    def head_kwargs(self) -> dict[str, Any]:
        return {"superimposed": self.superimposed}

    def bind_head(self, head: nn.Module) -> None:
        self.stride = int(head.stride)  # type: ignore[arg-type]
        self.superimposed = bool(getattr(head, "superimposed", False))

    def has_label(self, item: LabeledImage) -> bool:
        return item.screws is not None

    def targets(self, items: Sequence[LabeledImage]) -> dict[str, Tensor]:
        enc = [encode_screws(it.screws or [], *it.size, stride=self.stride, superimposed=self.superimposed)
               for it in items]
        return {k: torch.stack([e[k] for e in enc]) for k in enc[0]}

    def loss(self, out: Tensor, targets: dict[str, Tensor]) -> Tensor:
        return detection_loss(out, targets)

    def predict(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[list[dict[str, Any]]]:
        return screws_in_frames(out, self.ap_threshold, size, [it.size for it in originals])

    def tune_threshold(self, soft: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any] | None:
        """The score threshold with the highest F1 of matched screws (None: no screws or no
        predictions); ``at_default`` is the F1 at the current threshold."""
        best = f1_operating_point(soft, truths(items), self.max_dist, current=self.threshold)
        if best is None:
            return None
        return {"threshold": best["threshold"], "criterion": "f1", "value": best["f1"],
                "precision": best["precision"], "recall": best["recall"], "at_default": best["f1_at_current"]}

    def metrics(self, preds: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any]:
        return detection_metrics(preds, truths(items), max_dist=self.max_dist,
                                 spacings=[it.pixel_spacing_mm for it in items], score_threshold=self.threshold)
