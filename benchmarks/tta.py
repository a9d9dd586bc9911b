"""Test-time augmentation of one trained head: test metrics without and with each TTA mode.

    .venv/bin/python benchmarks/tta.py --backbone RUN --head HEAD --lake LAKE --labels SYNTH_RUN \
        [--modes none,flip,dihedral] [--match-px 10] --out benchmarks/results/tta_NAME.json

For every mode: the test metrics at the head's own operating point (tuned on val without TTA, what
``xrayfm evaluate --tta MODE`` reports), then at the operating point re-tuned on val under the
mode, and the seconds both took (one torch thread).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.tasks.data import load_labeled_images
from xrayfm.tasks.detect import DetectTask
from xrayfm.tasks.evaluate import _load_backbone
from xrayfm.tasks.train import load_head_bundle, predict_items, task_for_head
from xrayfm.tasks.tta import TTA_MODES


def _scalars(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not isinstance(v, list)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--lake", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--modes", default="none,flip")
    ap.add_argument("--match-px", type=float, help="screw matching radius (default: the head's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(TTA_MODES):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(TTA_MODES)}")
    bb, _ = _load_backbone(args.backbone)
    head, card = load_head_bundle(args.head)
    size = int(card["img_size"])
    val, _ = load_labeled_images(args.lake, args.labels, "val")
    test, _ = load_labeled_images(args.lake, args.labels, "test")
    result: dict[str, Any] = {"backbone": args.backbone, "head": args.head, "task": card["task"], "lake": args.lake,
                              "img_size": size, "threads": args.threads, "versions": versions(), "modes": {}}
    for mode in modes:
        task = task_for_head(card)
        if isinstance(task, DetectTask) and args.match_px:
            task.max_dist = args.match_px
        v, te = [it for it in val if task.has_label(it)], [it for it in test if task.has_label(it)]
        t0 = time.perf_counter()
        r: dict[str, Any] = {"head_operating_point": task.operating_point(),
                             "test": _scalars(task.metrics(predict_items(bb, head, task, te, size, tta=mode), te))}
        op = task.tune_threshold(predict_items(bb, head, task, v, size, soft=True, tta=mode), v)
        if op is not None:
            task.apply_operating_point(op)
            r["retuned_operating_point"] = task.operating_point()
            r["test_retuned"] = _scalars(task.metrics(predict_items(bb, head, task, te, size, tta=mode), te))
        r["seconds"] = round(time.perf_counter() - t0, 1)
        result["modes"][mode] = r
        print(mode, {k: r["test"].get(k) for k in ("accuracy", "dice_mean", "ap", "head_error_px", "tip_error_px")
                     if k in r["test"]}, f"{r['seconds']:.0f} s", flush=True)
        atomic_write_text(args.out, json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
