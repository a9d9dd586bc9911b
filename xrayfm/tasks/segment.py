"""Binary masks (metal, vertebrae): soft Dice + BCE on per-pixel logits; masks thresholded at p = 0.5,
or at the probability and smallest kept component that maximised the val split's mean Dice
(``heads train`` tunes both: :meth:`SegmentTask.tune_threshold`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from xrayfm.tasks.base import HeadTask, register_task
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.metrics import segmentation_metrics


def dice_bce_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0, smooth: float = 1.0) -> Tensor:
    """BCE (mean over pixels) + soft Dice loss over the whole batch ("batch Dice").

    Pooling the Dice over the batch, rather than averaging a smoothed Dice per image, keeps the
    few metal pixels from being outvoted: with per-image Dice every metal-free image rewards an
    empty prediction as much as a metal image rewards a correct one, and on C-arm data (two thirds
    of images without metal, screws a few hundred pixels) the head learned to predict nothing.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    soft = (2 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)
    return bce + dice_weight * (1 - soft)


def probability_maps(logits: Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per image, channel 0 of ``logits (B, C, h, w)`` upsampled bilinearly to its ``(H, W)`` in
    ``sizes``, then the sigmoid: float32 probability maps in the original frames."""
    return [torch.sigmoid(F.interpolate(logit[None, :1].float(), size=tuple(hw), mode="bilinear",
                                        align_corners=False)[0, 0]).cpu().numpy().astype(np.float32)
            for logit, hw in zip(logits, sizes)]


def binary_mask(prob: np.ndarray, threshold: float, min_area: float = 0.0) -> np.ndarray:
    """``prob > threshold`` without the 8-connected components smaller than ``min_area`` times the
    image's area (a fraction, so one operating point fits every image size)."""
    mask = prob > threshold
    if min_area <= 0 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    keep = np.bincount(labels.ravel()) >= min_area * mask.size
    keep[0] = False
    return keep[labels]


@register_task
class SegmentTask(HeadTask):
    """Binary metal mask."""

    name = "segment"
    default_head = "seg_decoder"
    input_kind = "dense"
    # thin metal: stride 2 reading the input image, +6.6 points of Dice on metal images over
    # stride 4 for about 4x the head's step time (docs/heads-experiments.md "Fine metal masks")
    default_out_stride = 2
    default_image_skip = True
    TUNE_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(18))  # 0.1 ... 0.95
    # smallest kept component, a fraction of the image area (at 256 px: 0, 7, 13, 33, 66, 131 px);
    # larger ones won on 180 training images but deleted real screws on 1,416 (docs/heads-experiments.md
    # "Dropping small components")
    MIN_AREA_GRID = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3)

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__(num_classes)
        self.threshold = 0.5
        self.min_area = 0.0  # components below this fraction of the image are dropped (0: none)

    def label_mask(self, item: LabeledImage) -> np.ndarray | None:
        """The item's true mask for this task (None = unlabelled)."""
        return item.mask

    def has_label(self, item: LabeledImage) -> bool:
        return self.label_mask(item) is not None

    def head_kwargs(self) -> dict[str, Any]:
        return {"num_classes": 1}

    def run_head(self, head: nn.Module, feats: Tensor | list[Tensor], size: tuple[int, int]) -> Tensor:
        return head(feats, size=size)

    def targets(self, items: Sequence[LabeledImage]) -> dict[str, Tensor]:
        masks = np.stack([self.label_mask(it) for it in items]).astype(np.float32)  # type: ignore[misc]
        return {"mask": torch.from_numpy(masks)[:, None]}

    def loss(self, out: Tensor, targets: dict[str, Tensor]) -> Tensor:
        return dice_bce_loss(out, targets["mask"])

    def predict_soft(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[np.ndarray]:
        """Probability maps (float32) in each original item's frame."""
        return probability_maps(out, [it.size for it in originals])

    def decide(self, soft: list[Any]) -> list[np.ndarray]:
        return [binary_mask(p, self.threshold, self.min_area) for p in soft]

    def predict(self, out: Tensor, originals: Sequence[LabeledImage], size: tuple[int, int]) -> list[np.ndarray]:
        return self.decide(self.predict_soft(out, originals, size))

    def tune_threshold(self, soft: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any] | None:
        """The probability of :attr:`TUNE_GRID` and smallest kept component of :attr:`MIN_AREA_GRID`
        with the highest mean Dice (ties: the threshold nearest 0.5, then the smaller area), the
        way nnU-Net keeps a component filter only where it helps on held-out cases; ``at_default``
        is the mean Dice at the current operating point."""
        trues = [self.label_mask(it) for it in items]
        points = [(t, a) for t in self.TUNE_GRID for a in self.MIN_AREA_GRID]
        dice = {(t, a): segmentation_metrics([binary_mask(p, t, a) for p in soft], trues, boundary_k=None)["dice_mean"]
                for t, a in (*points, (self.threshold, self.min_area))}
        t, a = max(points, key=lambda ta: (dice[ta], -abs(ta[0] - 0.5), -ta[1]))
        return {"threshold": t, "min_area": a, "criterion": "dice_mean", "value": dice[(t, a)],
                "at_default": dice[(self.threshold, self.min_area)]}

    def apply_operating_point(self, op: dict[str, Any]) -> None:
        super().apply_operating_point(op)
        self.min_area = float(op.get("min_area", 0.0))  # cards from before the component filter: none

    def operating_point(self) -> dict[str, float]:
        return {"threshold": self.threshold, "min_area": self.min_area}

    def metrics(self, preds: list[Any], items: Sequence[LabeledImage]) -> dict[str, Any]:
        return segmentation_metrics(preds, [self.label_mask(it) for it in items])


@register_task
class SegmentVertebraeTask(SegmentTask):
    """Binary vertebra mask (synth ``vertebrae_png``); same head family, loss and metrics as metal."""

    name = "segment_vertebrae"
    head_task = "segment"
    default_out_stride = 4  # vertebrae are large: the coarser, cheaper head (finer ones not measured)
    default_image_skip = False

    def label_mask(self, item: LabeledImage) -> np.ndarray | None:
        return item.bone_mask
