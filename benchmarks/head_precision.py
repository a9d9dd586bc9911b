"""Head training steps in fp32 vs bf16 autocast (``HeadTrainConfig.precision``), on this machine.

Times one optimiser step of each head the way ``train_head`` runs it (``HeadStepper``: the head's
forward under autocast, the task's loss in fp32, AdamW), for

* the dense heads on the feature cache: metal mask at stride 4, 2, 2 + image skip and 1 + image
  skip, screw keypoints at stride 4 without and with the image (ResNet-18 maps of the batch,
  computed once in fp32 as the cache is);
* fine-tuning (``unfreeze -1``, the backbone in the loop): ResNet-18 and ViT-tiny with the region
  head.

Inputs are crops of a real radiograph (pydicom-data RG1_UNCR) resized to ``--size``, with a
bright-pixel "metal" mask and one screw per image as labels (timing does not depend on them).

    .venv/bin/python benchmarks/head_precision.py [--size 128] [--batch 32] [--steps 4] [--threads 1]

Prints and writes benchmarks/results/head_precision.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrayfm.config import atomic_write_text, versions
from xrayfm.io import read_any
from xrayfm.models import create_backbone
from xrayfm.models.heads import create_head, head_pool
from xrayfm.models.runtime import resolve_precision
from xrayfm.tasks.base import HeadTask, get_task
from xrayfm.tasks.data import LabeledImage, images_tensor, resize_item
from xrayfm.tasks.features import backbone_features
from xrayfm.tasks.train import HeadStepper, HeadTrainConfig, head_arguments, set_trainable

RESULTS = Path(__file__).resolve().parent / "results" / "head_precision.json"


def radiograph_items(n: int, size: int, seed: int = 0) -> list[LabeledImage]:
    """``n`` random square crops of RG1_UNCR at ``size`` px with a mask and one screw each."""
    from pydicom.data import get_testdata_file

    img = next(iter(read_any(get_testdata_file("RG1_UNCR.dcm")))).image
    rng = np.random.default_rng(seed)
    side = min(img.shape) // 2
    items = []
    for i in range(n):
        y, x = rng.integers(0, img.shape[0] - side), rng.integers(0, img.shape[1] - side)
        it = resize_item(LabeledImage(image=np.ascontiguousarray(img[y:y + side, x:x + side]), image_id=str(i)), size)
        a, b = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.2, 0.8, 2) * size
        screw = {"head": a.tolist(), "tip": b.tolist(),
                 "box": [*np.minimum(a, b).tolist(), *np.maximum(a, b).tolist()], "end_on": False}
        items.append(LabeledImage(image=it.image, image_id=it.image_id, region_index=i % 11,
                                  mask=it.image > np.quantile(it.image, 0.97), screws=[screw]))
    return items


def time_steps(run: Any, steps: int) -> float:
    """Mean seconds of ``run()`` over ``steps`` calls after one warm-up call."""
    run()
    t = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t) / steps


def cache_step(task: HeadTask, cfg: HeadTrainConfig, feats: list[torch.Tensor], batch: list[LabeledImage],
               bb: torch.nn.Module, amp: torch.dtype | None, steps: int) -> float:
    """Seconds per step of a dense head on cached (fp32) features."""
    torch.manual_seed(0)
    head = create_head(task.default_head, bb.embed_dim, bb.dense_channels, bb.dense_strides,
                       **head_arguments(task, cfg))
    task.bind_head(head)
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    stepper = HeadStepper(opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0), torch.device("cpu"), amp)
    size = batch[0].size

    def run() -> None:
        with stepper.autocast():
            out = task.run_head(head, feats, size)
        stepper.step(task, out, batch)

    return time_steps(run, steps)


def finetune_step(arch: str, batch: list[LabeledImage], amp: torch.dtype | None, steps: int) -> float:
    """Seconds per step of the region head with the whole backbone fine-tuned (backbone in the loop)."""
    torch.manual_seed(0)
    size = batch[0].size[0]
    bb = create_backbone(arch, img_size=size)
    task = get_task("classify")
    cfg = HeadTrainConfig(task="classify", img_size=size, pool=bb.resolve_pool("auto"))
    head = create_head(task.default_head, bb.embed_dim, bb.dense_channels, bb.dense_strides,
                       **head_arguments(task, cfg))
    params = set_trainable(bb, -1)
    bb.train()
    opt = torch.optim.AdamW([*head.parameters(), *params], 1e-3)
    stepper = HeadStepper(opt, torch.optim.lr_scheduler.ConstantLR(opt, 1.0), torch.device("cpu"), amp)
    x = images_tensor(batch)

    def run() -> None:
        with stepper.autocast():
            out = task.run_head(head, backbone_features(bb, x, "pooled", head_pool(head)), (size, size))
        stepper.step(task, out, batch)

    return time_steps(run, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = resolve_precision("bf16", torch.device("cpu"))
    if bf16 is None:
        raise SystemExit("this CPU has no fast bf16 (AMX/AVX-512): nothing to compare")
    batch = radiograph_items(args.batch, args.size)
    torch.manual_seed(0)
    bb = create_backbone("resnet18", img_size=args.size).eval()
    with torch.no_grad():
        maps = backbone_features(bb, images_tensor(batch), "dense", image=True)
    rows = []
    cases = [("segment", 4, False), ("segment", 2, False), ("segment", 2, True), ("segment", 1, True),
             ("detect", 4, False), ("detect", 4, True)]
    for name, stride, skip in cases:
        task = get_task(name)
        cfg = HeadTrainConfig(task=name, img_size=args.size, out_stride=stride, image_skip=skip)
        feats = maps if skip else maps[:-1]
        t = {p: cache_step(task, cfg, feats, batch, bb, amp, args.steps) for p, amp in (("fp32", None), ("bf16", bf16))}
        rows.append({"case": f"{name} stride {stride}{' + image skip' if skip else ''} (cache)", **t})
        print(json.dumps(rows[-1]), flush=True)
    for arch in ("resnet18", "vit_tiny_patch16"):
        t = {p: finetune_step(arch, batch, amp, args.steps) for p, amp in (("fp32", None), ("bf16", bf16))}
        rows.append({"case": f"classify, {arch} fine-tuned (unfreeze -1)", **t})
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        r["fp32"], r["bf16"] = round(r["fp32"], 4), round(r["bf16"], 4)
        r["speedup"] = round(r["fp32"] / r["bf16"], 2)
    doc = {"size": args.size, "batch": args.batch, "steps": args.steps, "threads": args.threads,
           "load_avg_1m": os.getloadavg()[0], "versions": versions(), "seconds_per_step": rows}
    atomic_write_text(args.out, json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
