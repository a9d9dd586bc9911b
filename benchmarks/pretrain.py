"""Throughput of one DINO training step: xrayfm's trainer vs the peer's way, side by side.

Setup of docs/pretrain.md and shared/notes/performance.md: 2 global crops 128 px + 6 local
crops 64 px, batch 16, out_dim 4096 (head hidden 2048, bottleneck 256), AdamW, random crops (data
loading off the critical path), one input channel. For each backbone it times

* ``xrayfm``: ``Trainer.train_step`` (one backbone call per crop resolution, fused AdamW, foreach
  EMA, global gradient clipping, schedules, centre) in fp32 and with bf16 autocast;
* ``peer``: a re-implementation of how the lightly DINO example assembles its pieces (one
  backbone call per crop, weight-normalised last layer via ``torch.nn.utils``, pairwise loss in
  Python, per-parameter EMA loop, default AdamW) in fp32 and bf16 autocast.

FLOPs per image come from ``torch.utils.flop_counter`` over a full xrayfm step; the fp32 floor
is the best measured fp32 2048^3 matmul rate divided by them. The machine is shared, so the
variants run interleaved, one step each per round, and both the fastest and the median step are
reported; the 1-minute load average is recorded next to the numbers.

    .venv/bin/python benchmarks/pretrain.py [--rounds 6] [--threads N] [--archs vit_tiny_patch16,resnet18]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xrayfm.config import atomic_write_text, versions
from xrayfm.models.backbones import backbone_spec
from xrayfm.ssl import PretrainConfig, Trainer

BATCH, N_GLOBAL, N_LOCAL, G, L, OUT_DIM = 16, 2, 6, 128, 64, 4096
Step = Callable[[dict[str, torch.Tensor]], dict[str, float]]
RESULTS = Path(__file__).resolve().parent / "results" / "pretrain.json"


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.rand(N_GLOBAL * BATCH, 1, G, G, generator=g),
            "local": torch.rand(N_LOCAL * BATCH, 1, L, L, generator=g)}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def ours(arch: str, precision: str) -> Step:
    cfg = PretrainConfig(arch=arch, global_size=G, local_size=L, n_local=N_LOCAL, out_dim=OUT_DIM,
                         batch_size=BATCH, epochs=100, num_workers=0, precision=precision)
    items = [{"image": torch.rand(1, G, G)} for _ in range(BATCH)]
    # only train_step is used: the run folder is never written (fit() is not called)
    trainer = Trainer(cfg, Path(tempfile.gettempdir()) / "xrayfm_bench_unused", items, show_progress=False)
    trainer.method.train()
    return trainer.train_step


class PeerHead(nn.Module):
    """The lightly-style DINO projection head (MLP, L2 norm, weight-normalised last layer)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                                 nn.Linear(2048, 256))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(256, OUT_DIM, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def peer(arch: str, amp: bool) -> Step:
    """One backbone call per crop, pairwise Python loss, per-parameter EMA, default AdamW."""
    spec = backbone_spec(arch)  # plain timm model: stock attention, no channels-last, default precision
    kwargs = {"dynamic_img_size": True} if spec.family == "vit" else {}
    backbone = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=0, **kwargs)
    student = nn.Sequential(backbone, PeerHead(backbone.num_features))
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    center = torch.zeros(1, OUT_DIM)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        nonlocal center
        views = [*batch["global"].chunk(N_GLOBAL), *batch["local"].chunk(N_LOCAL)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_out = [teacher(v).float() for v in views[:N_GLOBAL]]
            s_out = [student(v).float() for v in views]
        q = [F.softmax((t - center) / 0.04, dim=-1) for t in t_out]
        logp = [F.log_softmax(s / 0.1, dim=-1) for s in s_out]
        loss, n = 0.0, 0
        for iq, qq in enumerate(q):
            for iv, lp in enumerate(logp):
                if iv != iq:
                    loss = loss + torch.sum(-qq * lp, dim=-1).mean()
                    n += 1
        loss = loss / n
        center = center * 0.9 + torch.cat(t_out).mean(0, keepdim=True) * 0.1
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.data = pt.data * 0.996 + ps.data * 0.004
        return {"loss": loss.item()}

    return step


def step_seconds(step: Step, seed: int) -> float:
    batch = random_batch(seed)
    t = time.perf_counter()
    step(batch)
    return time.perf_counter() - t


def flops_per_image(arch: str) -> float:
    step = ours(arch, "fp32")
    with FlopCounterMode(display=False) as counter:
        step(random_batch(0))
    return counter.get_total_flops() / BATCH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--archs", default="vit_tiny_patch16,resnet18")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict[str, object] = {
        "setup": f"batch {BATCH}, {N_GLOBAL}x{G} + {N_LOCAL}x{L} crops, out_dim {OUT_DIM}, 1 channel",
        "method": f"variants interleaved step by step for {args.rounds} rounds after 2 warm-up steps; "
                  "best = fastest step (least disturbed by other jobs), median = median step",
        "threads": torch.get_num_threads(), "load_avg_1min_before": os.getloadavg()[0],
        "versions": versions(), "archs": {}}
    for arch in args.archs.split(","):
        gflop = flops_per_image(arch) / 1e9
        makers: dict[str, Callable[[], Step]] = {
            "xrayfm_fp32": partial(ours, arch, "fp32"), "xrayfm_bf16": partial(ours, arch, "bf16"),
            "peer_fp32": partial(peer, arch, False), "peer_bf16": partial(peer, arch, True)}
        steps = {name: make() for name, make in makers.items()}
        for name, step in steps.items():  # warm-up: allocator, oneDNN primitives
            step_seconds(step, 0)
            step_seconds(step, 1)
        times: dict[str, list[float]] = {name: [] for name in steps}
        peaks: list[float] = []
        for r in range(args.rounds):
            peaks.append(matmul_gflops(torch.float32))
            for name, step in steps.items():
                times[name].append(step_seconds(step, 2 + r))
        floor = max(peaks) / gflop
        row: dict[str, object] = {"gflop_per_image": round(gflop, 3),
                                  "matmul_fp32_gflops_best": round(max(peaks), 1),
                                  "fp32_floor_images_per_s": round(floor, 2)}
        for name, ts in times.items():
            best, median = BATCH / min(ts), BATCH / statistics.median(ts)
            row[name] = {"images_per_s_best": round(best, 2), "images_per_s_median": round(median, 2),
                         "pct_of_fp32_floor_best": round(100 * best / floor, 1)}
            print(f"{arch:18s} {name:12s} best {best:6.2f} median {median:6.2f} images/s "
                  f"({100 * best / floor:5.1f}% of fp32 floor)", flush=True)
        base = BATCH / statistics.median(times["peer_fp32"])
        row["median_speedup_vs_peer_fp32"] = {
            name: round(BATCH / statistics.median(ts) / base, 2) for name, ts in times.items()}
        result["archs"][arch] = row  # type: ignore[index]
    result["load_avg_1min_after"] = os.getloadavg()[0]
    atomic_write_text(RESULTS, json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
