"""Metal-mask operating points: threshold only vs threshold + smallest kept component.

For each trained segment head (``xrayfm heads train`` output folders), predicts probability maps
on the val and test splits once, then picks the operating point on val by mean Dice (as
``SegmentTask.tune_threshold`` does, ties to the threshold nearest 0.5, then the smaller area)
over three component-area grids and scores the test split at it:

* ``threshold``: probability only (no component filter; the behaviour before 2026-12-06);
* ``library``: ``SegmentTask.MIN_AREA_GRID`` (what ``heads train`` tunes now);
* ``wide``: that grid plus 0.5 % and 1 % of the image area.

    .venv/bin/python benchmarks/mask_operating_point.py --backbone RUN --lake LAKE --labels LABELS \\
        --heads HEAD [--heads HEAD ...] [--out benchmarks/results/mask_operating_point.json]

Prints one JSON row per (head, grid) and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import load_labeled_images
from xrayfm.tasks.evaluate import _load_backbone
from xrayfm.tasks.segment import SegmentTask
from xrayfm.tasks.train import load_head_bundle, predict_items

RESULTS = Path(__file__).resolve().parent / "results" / "mask_operating_point.json"
GRIDS = {"threshold": (0.0,), "library": SegmentTask.MIN_AREA_GRID,
         "wide": (*SegmentTask.MIN_AREA_GRID, 5e-3, 1e-2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", required=True, help="pretrain run or exported backbone the heads were trained on")
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--heads", action="append", required=True, help="segment head folder (repeat)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    backbone, _ = _load_backbone(args.backbone)
    splits = {s: [it for it in load_labeled_images(args.lake, args.labels, s)[0] if it.mask is not None]
              for s in ("val", "test")}
    if not all(splits.values()):
        raise SystemExit(f"{args.lake}: needs val and test images with masks (got "
                         f"{len(splits['val'])} / {len(splits['test'])})")
    rows: list[dict[str, Any]] = []
    for hp in args.heads:
        head, card = load_head_bundle(hp)
        if card["task"] != "segment":
            raise SystemExit(f"{hp} is a {card['task']} head; pass segment heads")
        probe = get_task("segment")
        soft = {s: predict_items(backbone, head, probe, items, int(card["img_size"]), soft=True)
                for s, items in splits.items()}
        for grid_name, grid in GRIDS.items():
            task = get_task("segment")
            task.MIN_AREA_GRID = grid  # type: ignore[attr-defined]
            op = task.tune_threshold(soft["val"], splits["val"])
            task.apply_operating_point(op)  # type: ignore[arg-type]
            m = task.metrics(task.decide(soft["test"]), splits["test"])
            row = {"head": str(hp), "grid": grid_name, **task.operating_point(), "val_dice_mean": round(op["value"], 4),
                   **{k: round(float(m[k]), 4) for k in ("dice_mean", "dice_positive_mean", "empty_fp_rate")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"backbone": args.backbone, "lake": args.lake, "n_val": len(splits["val"]),
              "n_test": len(splits["test"]), "grids": {k: list(v) for k, v in GRIDS.items()},
              "threads": args.threads, "load_avg_1m": os.getloadavg()[0], "versions": versions(), "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
