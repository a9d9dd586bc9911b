"""Throughput of one DINO training step: xrayfm's trainer vs the peer's way, side by side.

Setup of docs/pretrain.md and shared/notes/performance.md: 2 global crops 128 px + 6 local
crops 64 px, batch 16, out_dim 4096 (head hidden 2048, bottleneck 256), AdamW, random crops (data
loading off the critical path), one input channel. For each backbone it times

* ``xrayfm``: ``Trainer.train_step`` (one backbone call per crop resolution, fused AdamW, foreach
  EMA, global gradient clipping, schedules, centre) in fp32 and with bf16 autocast;
* ``lightly``: the ``lightly`` package's own pieces (``pip install -e '.[bench]'``:
  ``DINOProjectionHead`` with the same sizes, ``DINOLoss``, ``update_momentum``,
  ``cancel_last_layer_gradients``) assembled as its DINO example does (one backbone call per crop,
  a list of views into the loss, Adam), in fp32 and bf16 autocast; skipped when not installed;
* ``peer``: our re-implementation of that example (one backbone call per crop, weight-normalised
  last layer via ``torch.nn.utils``, pairwise loss in Python, per-parameter EMA loop, default
  AdamW) in fp32 and bf16 autocast, for machines without ``lightly``.

FLOPs per image come from ``torch.utils.flop_counter`` over a full xrayfm step; the fp32 floor
is the best measured fp32 2048^3 matmul rate divided by them. The machine is shared, so the
variants run interleaved, one step each per round, and both the fastest and the median step are
reported; the 1-minute load average is recorded next to the numbers. Peak memory is each
variant's resident-set high-water mark over 3 steps in a fresh process (``--no-memory`` skips it).

    .venv/bin/python benchmarks/pretrain.py [--rounds 6] [--threads N] [--archs vit_tiny_patch16,resnet18]
        [--out benchmarks/results/pretrain.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
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


def lightly_step(arch: str, amp: bool) -> Step:
    """lightly 1.6's DINO pieces, assembled as its example does, on the same timm backbone."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    spec = backbone_spec(arch)
    kwargs = {"dynamic_img_size": True} if spec.family == "vit" else {}

    def make() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        bb = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=0, **kwargs)
        return bb, DINOProjectionHead(bb.num_features, 2048, 256, OUT_DIM, freeze_last_layer=1)

    s_bb, s_head = make()
    t_bb, t_head = make()  # identical weights; weight-normed heads cannot be deep-copied
    deactivate_requires_grad(t_bb)
    deactivate_requires_grad(t_head)
    criterion = DINOLoss(output_dim=OUT_DIM, warmup_teacher_temp_epochs=5)
    opt = torch.optim.Adam([*s_bb.parameters(), *s_head.parameters()], lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        views = [*batch["global"].chunk(N_GLOBAL), *batch["local"].chunk(N_LOCAL)]
        update_momentum(s_bb, t_bb, m=0.996)
        update_momentum(s_head, t_head, m=0.996)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            t_out = [t_head(t_bb(v).flatten(start_dim=1)) for v in views[:N_GLOBAL]]
            s_out = [s_head(s_bb(v).flatten(start_dim=1)) for v in views]
        loss = criterion([t.float() for t in t_out], [o.float() for o in s_out], epoch=1)
        loss.backward()
        s_head.cancel_last_layer_gradients(current_epoch=1)
        opt.step()
        opt.zero_grad()
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


def variant_makers(arch: str) -> dict[str, Callable[[], Step]]:
    """Every variant's step builder; the ``lightly_*`` ones only when lightly is installed."""
    makers: dict[str, Callable[[], Step]] = {
        "xrayfm_fp32": partial(ours, arch, "fp32"), "xrayfm_bf16": partial(ours, arch, "bf16"),
        "peer_fp32": partial(peer, arch, False), "peer_bf16": partial(peer, arch, True)}
    try:
        import lightly  # noqa: F401
    except ImportError:
        return makers
    makers.update({"lightly_fp32": partial(lightly_step, arch, False),
                   "lightly_bf16": partial(lightly_step, arch, True)})
    return makers


def _status_mb(key: str) -> float:
    """A memory line of ``/proc/self/status`` in MB (Linux; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _probe(arch: str, name: str) -> None:
    """Child process of :func:`memory_probe`: build one variant, run 3 steps, print its memory as JSON.
    ``VmHWM`` is the high-water mark of this process's own address space (``getrusage``'s maxrss
    would include the parent's, inherited at fork)."""
    step = variant_makers(arch)[name]()
    batch = random_batch(0)
    built = _status_mb("VmRSS")
    for _ in range(3):
        step(batch)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "step_rss_mb": round(peak - built, 1)}))


def memory_probe(arch: str, name: str, threads: int) -> dict[str, float]:
    """Peak resident memory of one variant's training in a fresh process (CPU has no allocator
    high-water mark like CUDA's): ``peak_rss_mb`` = the process's high-water mark over 3 steps,
    ``step_rss_mb`` = that minus the memory held once model, optimiser and batch exist."""
    out = subprocess.run([sys.executable, __file__, "--probe", f"{arch}:{name}", "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--archs", default="vit_tiny_patch16,resnet18")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch's default)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="variants to time: fp32 alone where the CPU has no fast bf16 (emulated bf16 is slow)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure each variant's peak memory in a fresh process")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        _probe(*args.probe.split(":", 1))
        return
    torch.manual_seed(0)
    result: dict[str, object] = {
        "setup": f"batch {BATCH}, {N_GLOBAL}x{G} + {N_LOCAL}x{L} crops, out_dim {OUT_DIM}, 1 channel",
        "method": f"variants interleaved step by step for {args.rounds} rounds after 2 warm-up steps; "
                  "best = fastest step (least disturbed by other jobs), median = median step",
        "threads": torch.get_num_threads(), "cpu_fast_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "load_avg_1min_before": os.getloadavg()[0],
        "versions": versions(), "archs": {}}
    for arch in args.archs.split(","):
        gflop = flops_per_image(arch) / 1e9
        makers = {name: make for name, make in variant_makers(arch).items()
                  if name.rsplit("_", 1)[1] in args.precisions.split(",")}
        if "lightly_fp32" not in makers:
            print("lightly is not installed (pip install -e '.[bench]'): measuring the re-implementation only")
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
        if args.memory:
            for name in times:
                row[name].update(memory_probe(arch, name, torch.get_num_threads()))  # type: ignore[union-attr]
                print(f"{arch:18s} {name:12s} peak RSS {row[name]['peak_rss_mb']:7.0f} MB "  # type: ignore[index]
                      f"(step adds {row[name]['step_rss_mb']:6.0f} MB)", flush=True)  # type: ignore[index]
        for ref in ("peer_fp32", "lightly_fp32", "lightly_bf16"):
            if ref in times:
                base = BATCH / statistics.median(times[ref])
                row[f"median_speedup_vs_{ref}"] = {
                    name: round(BATCH / statistics.median(ts) / base, 2) for name, ts in times.items()}
        result["archs"][arch] = row  # type: ignore[index]
    result["load_avg_1min_after"] = os.getloadavg()[0]
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
