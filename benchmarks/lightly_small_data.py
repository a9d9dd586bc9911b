"""Cross-check of small-data collapse with the ``lightly`` package's own DINO pieces.

    pip install lightly==1.6.0   # the ``bench`` extra
    python benchmarks/lightly_small_data.py LAKE LABELS [ARCH] [EPOCHS]

Assembles lightly's ``DINOProjectionHead`` (hidden 512, bottleneck 64, out 2048, last layer frozen
for epoch 0), ``DINOLoss`` (teacher temperature warm-up over 5 epochs), ``update_momentum`` and
``cosine_schedule`` (0.996 -> 1 per epoch) and Adam lr 1e-3 the way lightly's DINO example does,
on our backbone (one input channel) and our X-ray multi-crop views (64/32 px, 4 local crops,
batch 32) of the lake's train split. After each epoch it prints the teacher entropy (collapse to
uniform shows as ln 2048 = 7.62) and the class-balanced weighted-kNN accuracy (k=20) of the
teacher backbone on the val split; JSON goes to ``benchmarks/results/lightly_small_data.json``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from xrayfm.models.backbones import create_backbone
from xrayfm.ssl.multicrop import AugmentConfig, MultiCropTransform, collate_crops
from xrayfm.tasks.data import load_labeled_images
from xrayfm.tasks.evaluate import knn_region_monitor

SIZE, BATCH, N_LOCAL, OUT_DIM = 64, 32, 4, 2048


def main() -> None:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    lake, labels = sys.argv[1], sys.argv[2]
    arch = sys.argv[3] if len(sys.argv) > 3 else "resnet18"
    epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    tr, _ = load_labeled_images(lake, labels, "train")
    va, _ = load_labeled_images(lake, labels, "val")
    imgs = [F.interpolate(torch.from_numpy(i.image)[None, None].float(), size=(SIZE * 3 // 2,) * 2,
                          mode="area")[0] for i in tr]

    knn = knn_region_monitor(tr, va, SIZE)

    def balanced_knn(backbone: torch.nn.Module) -> float:
        result = knn(backbone)["knn_balanced_accuracy"]
        backbone.train()  # pooled_features switched it to eval
        return result

    torch.manual_seed(0)
    backbone = create_backbone(arch, img_size=SIZE)
    head = DINOProjectionHead(backbone.embed_dim, 512, 64, OUT_DIM, freeze_last_layer=1)
    student = torch.nn.Sequential(backbone, head)
    t_backbone = create_backbone(arch, img_size=SIZE)
    t_head = DINOProjectionHead(backbone.embed_dim, 512, 64, OUT_DIM)
    t_backbone.load_state_dict(backbone.state_dict())
    t_head.load_state_dict(head.state_dict())  # weight-normed heads cannot be deep-copied
    teacher = torch.nn.Sequential(t_backbone, t_head)
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=OUT_DIM, warmup_teacher_temp_epochs=5)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.001)
    views = MultiCropTransform(SIZE, SIZE // 2, N_LOCAL, (0.4, 1.0), (0.05, 0.4), AugmentConfig())
    g = torch.Generator().manual_seed(0)
    record: dict = {"arch": arch, "n_train": len(tr), "n_val": len(va), "random_init_knn_balanced": balanced_knn(t_backbone),
                    "epochs": []}
    print(f"{arch}: random-init balanced kNN {record['random_init_knn_balanced']}", flush=True)
    t0 = time.time()
    for epoch in range(epochs):
        momentum = cosine_schedule(epoch, epochs, 0.996, 1)
        order = torch.randperm(len(imgs), generator=g)
        for b in range(len(imgs) // BATCH):
            batch = collate_crops([views(imgs[i], g) for i in order[b * BATCH:(b + 1) * BATCH]])
            update_momentum(student, teacher, momentum)
            t_out = [teacher(x) for x in batch["global"].chunk(2)]
            s_out = [student(x) for x in batch["global"].chunk(2)] + [student(x) for x in batch["local"].chunk(N_LOCAL)]
            loss = criterion(t_out, s_out, epoch=epoch)
            loss.backward()
            head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            schedule = criterion.teacher_temp_schedule
            temp = float(schedule[epoch]) if epoch < len(schedule) else criterion.teacher_temp
            q = F.softmax((torch.cat(t_out) - criterion.center) / temp, dim=-1)
            entropy = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
        row = {"epoch": epoch, "loss": round(loss.item(), 3), "teacher_entropy": round(entropy, 2),
               "knn_balanced": balanced_knn(t_backbone), "seconds": round(time.time() - t0, 1)}
        record["epochs"].append(row)
        print(row, flush=True)
    out = Path(__file__).parent / "results" / "lightly_small_data.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
