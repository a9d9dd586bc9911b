"""Where one xrayfm DINO step spends its time: torch.profiler over a few steps of ``Trainer.train_step``.

Prints, per backbone, the wall time per step, the device's busy time per step (the sum of its
kernels' self time: far below the wall time means the step is bound by the CPU launching work, not
by the GPU), and the operators ranked by device time and by CPU time; the tables also go to
``--out`` as text. Uses the setup of ``benchmarks/pretrain.py`` (GPU: 2 x 224 + 10 x 96, batch 64).

    python benchmarks/profile_step.py [--archs vit_small_patch16,resnet50] [--batch 64] [--steps 3]
        [--precision bf16] [--out benchmarks/results/profile_step.txt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pretrain import DEVICE, device_setup, ours, random_batch, sync
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from xrayfm.config import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="vit_small_patch16,resnet50")
    ap.add_argument("--batch", type=int, default=0, help="images per step (0 = the setup's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_step.txt")
    args = ap.parse_args()
    cuda = DEVICE.type == "cuda"
    s = device_setup(args.batch)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    report = [f"setup: {s.text()}, {args.precision}, device {DEVICE}"]
    for arch in args.archs.split(","):
        step = ours(arch, args.precision, s)
        batch = random_batch(s, 0)
        for _ in range(2):
            step(batch)
        sync()
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                step(batch)
            sync()
            wall = (time.perf_counter() - t) / args.steps
        events = prof.key_averages()
        # kernel rows only on a GPU: an operator's row repeats its kernels' time
        busy = sum(getattr(e, device_key) for e in events
                   if not cuda or e.device_type == DeviceType.CUDA) / 1e6 / args.steps
        head = (f"{arch}: wall {1e3 * wall:.1f} ms/step under the profiler, "
                f"{'GPU' if cuda else 'CPU'} busy {1e3 * busy:.1f} ms/step ({100 * busy / wall:.0f} %)")
        print(head, flush=True)
        report += [head, events.table(sort_by=device_key, row_limit=20),
                   events.table(sort_by="cpu_time_total", row_limit=15)]
        del step
    atomic_write_text(args.out, "\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
