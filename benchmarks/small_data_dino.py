"""Small-data DINO probe: short runs of the trainer on one lake's train split + kNN on its val split.

    python benchmarks/small_data_dino.py LAKE LABELS GLOBAL_SIZE '{"name": {config overrides}}' [ARCH]

e.g. ``... /tmp/dd/lake /tmp/dd/synth/labels.parquet 64 '{"noaug": {"augment": {"window_p": 0}}}'``.
Base settings: the demo's small-data recipe (xrayfm/cli/demo.py SMALL_DATA_PRETRAIN), vit_tiny_patch16,
6 epochs, batch 32, local crops GLOBAL_SIZE/2, 4 local crops, out_dim 1024. Train images are held
in memory at 1.5 x GLOBAL_SIZE (faster augmentations than the lake's full-size images). Prints the
teacher-entropy trajectory, the final teacher entropy (H) and batch entropy (Hb), and the weighted
kNN (k=20, T=0.07) region accuracy and class-balanced accuracy of the exported (teacher) backbone.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from xrayfm.cli.demo import SMALL_DATA_PRETRAIN
from xrayfm.models.backbones import create_backbone
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.multicrop import AugmentConfig
from xrayfm.ssl.trainer import Trainer
from xrayfm.tasks.data import load_labeled_images
from xrayfm.tasks.evaluate import knn_region_monitor


def main() -> None:
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    lake, labels, size, exps = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    arch = sys.argv[5] if len(sys.argv) > 5 else "vit_tiny_patch16"
    tr, _ = load_labeled_images(lake, labels, "train")
    va, _ = load_labeled_images(lake, labels, "val")
    imgs = [F.interpolate(torch.from_numpy(i.image)[None, None].float(), size=(int(size * 1.5),) * 2,
                          mode="area")[0] for i in tr]

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(imgs)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": imgs[i]}

    knn_stats = knn_region_monitor(tr, va, size)

    def knn(bb: torch.nn.Module) -> str:
        r = knn_stats(bb)
        return f"{r['knn_accuracy']:.3f} (balanced {r['knn_balanced_accuracy']:.3f})"

    torch.manual_seed(0)
    print(f"n_train={len(tr)} n_val={len(va)}; "
          f"{arch} random-init knn={knn(create_backbone(arch, img_size=size))}", flush=True)
    base: dict[str, Any] = {"arch": arch, "epochs": 6, "batch_size": 32, "global_size": size,
                            "local_size": size // 2, "n_local": 4, "out_dim": 1024, "num_workers": 0,
                            "log_every": 1, "checkpoint_every": 10**6}
    base.update(yaml.safe_load(SMALL_DATA_PRETRAIN))
    for name, over in exps.items():
        kw = dict(base)
        aug = over.pop("augment", None)
        kw.update(over)
        kw["augment"] = replace(AugmentConfig(), **{**kw.get("augment", {}), **(aug or {})})
        cfg = PretrainConfig(**kw)
        out = f"/tmp/small_data_dino/{name}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        trainer = Trainer(cfg, out, Images(), show_progress=False, monitor=knn_stats)
        trainer.fit()
        recs = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        mon = [json.loads(line) for line in Path(out, "monitor.jsonl").read_text().splitlines()]
        print(f"{name}: balanced kNN per epoch {[m['knn_balanced_accuracy'] for m in mon]}", flush=True)
        h = [round(r["teacher_entropy"], 2) for r in recs]
        print(f"{name}: {over} augment={aug} | H {h[::max(1, len(h) // 8)]} final H={h[-1]:.2f} "
              f"Hb={recs[-1]['teacher_batch_entropy']:.2f} loss={recs[-1]['loss']:.2f} | "
              f"knn={knn(trainer.method.trained_backbone())} | {len(recs)} steps {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
