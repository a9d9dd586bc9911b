"""Resolution ceiling of mask heads: the Dice a perfect predictor reaches when its mask passes
through a head's input size and output stride, on a labelled lake's test images with metal.

For each head input size S and logit stride s, the true mask is resized to S x S (nearest),
average-pooled by s (the best soft mask a stride-s logit map can hold), bilinearly upsampled to the
lake image and thresholded at 0.5 (``SegmentTask.predict`` thresholds bilinearly upsampled logits
at 0; pooled probabilities at 0.5 are the closest mask-only stand-in, not an exact bound).
Also a global intensity threshold (is metal simply the brightest thing?).

    .venv/bin/python benchmarks/seg_ceiling.py --lake LAKE --labels SYNTH_RUN \
        [--sizes 128,256] [--strides 1,2,4] [--out benchmarks/results/seg_ceiling.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xrayfm.config import atomic_write_text, versions
from xrayfm.tasks.data import LabeledImage, load_labeled_images, resize_mask
from xrayfm.tasks.metrics import segmentation_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "seg_ceiling.json"


def ceiling_dice(items: list[LabeledImage], size: int, stride: int) -> float:
    """Mean Dice of the true masks after the size/stride round trip (see module docstring)."""
    preds = []
    for it in items:
        m = torch.from_numpy(resize_mask(it.mask, size, size).astype(np.float32))[None, None]
        g = F.avg_pool2d(m, stride) if stride > 1 else m
        up = F.interpolate(g, size=it.size, mode="bilinear", align_corners=False)
        preds.append((up[0, 0] > 0.5).numpy())
    return float(segmentation_metrics(preds, [it.mask for it in items])["dice_mean"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--strides", default="1,2,4")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    items, _ = load_labeled_images(args.lake, args.labels, args.split)
    pos = [it for it in items if it.mask is not None and it.mask.any()]
    if not pos:
        raise SystemExit(f"{args.lake}: no {args.split} images with a metal mask; check --labels and --split")
    rows = {}
    for size in map(int, args.sizes.split(",")):
        for stride in map(int, args.strides.split(",")):
            rows[f"size{size}_stride{stride}"] = d = round(ceiling_dice(pos, size, stride), 4)
            print(f"head input {size} px, logits at stride {stride}: ceiling Dice on metal images {d:.3f}")
    thresholds = {str(t): round(float(segmentation_metrics([it.image > t for it in pos], [it.mask for it in pos])
                                      ["dice_mean"]), 4) for t in (0.8, 0.9, 0.95)}
    print(f"global intensity threshold Dice: {thresholds}")
    result = {"lake": args.lake, "labels": args.labels, "split": args.split, "n_metal_images": len(pos),
              "image_size": list(pos[0].size), "mean_metal_px": round(float(np.mean([it.mask.sum() for it in pos])), 1),
              "ceiling_dice": rows, "intensity_threshold_dice": thresholds, "versions": versions()}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
