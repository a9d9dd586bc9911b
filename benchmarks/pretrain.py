"""Throughput of one DINO training step: xrayfm's trainer vs the peer's way, side by side.

CPU setup (docs/pretrain.md, shared/notes/performance.md): 2 global crops 128 px + 6 local crops
64 px, batch 16, out_dim 4096 (head hidden 2048, bottleneck 256). On a GPU the setup is the
reference recipe per GPU: 2 x 224 px + 10 x 96 px, batch 64, out_dim 65536. AdamW, random crops
made on the device beforehand (data loading off the critical path), one input channel. For each
backbone it times

* ``xrayfm``: ``Trainer.train_step`` (one backbone call per crop resolution, fused AdamW, foreach
  EMA, global gradient clipping, schedules, centre) in fp32 and with bf16 autocast (``--compile``
  adds ``xrayfm_bf16_compiled``, the backbones under ``torch.compile``);
* ``lightly``: the ``lightly`` package's own pieces (``pip install -e '.[bench]'``:
  ``DINOProjectionHead`` with the same sizes, ``DINOLoss``, ``update_momentum``,
  ``cancel_last_layer_gradients``) assembled as its DINO example does (one backbone call per crop,
  a list of views into the loss, Adam), in fp32 and bf16 autocast; skipped when not installed;
* ``peer``: our re-implementation of that example (one backbone call per crop, weight-normalised
  last layer via ``torch.nn.utils``, pairwise loss in Python, per-parameter EMA loop, default
  AdamW) in fp32 and bf16 autocast, for machines without ``lightly`` (``--no-peer`` skips it).

FLOPs per image come from ``torch.utils.flop_counter`` over a full xrayfm step; the fp32 floor
is the best measured fp32 matmul rate divided by them. On a GPU the report adds the model FLOPs
utilisation (MFU: FLOPs per image x images/s over the chip's dense bf16 peak from its datasheet)
and the share of the best measured bf16 matmul rate. The variants run interleaved, one step each
per round, and both the fastest and the median step are reported; the 1-minute load average is
recorded next to the numbers. Peak memory: on CPU each variant's resident-set high-water mark over
3 steps in a fresh process, on a GPU the allocator's high-water mark over 3 steps of that variant
alone (``--no-memory`` skips it).

    .venv/bin/python benchmarks/pretrain.py [--rounds 6] [--threads N] [--archs vit_tiny_patch16,resnet18]
        [--precisions fp32,bf16] [--batch B] [--compile] [--no-peer] [--out benchmarks/results/pretrain.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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

Step = Callable[[dict[str, torch.Tensor]], dict[str, float]]
RESULTS = Path(__file__).resolve().parent / "results" / "pretrain.json"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what Trainer picks too
# dense bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (SXM parts)
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass(frozen=True)
class Setup:
    """One step's crops and head size."""

    batch: int
    n_global: int
    n_local: int
    global_size: int
    local_size: int
    out_dim: int

    def text(self) -> str:
        return (f"batch {self.batch}, {self.n_global}x{self.global_size} + {self.n_local}x{self.local_size} "
                f"crops, out_dim {self.out_dim}, 1 channel")


CPU_SETUP = Setup(batch=16, n_global=2, n_local=6, global_size=128, local_size=64, out_dim=4096)
GPU_SETUP = Setup(batch=64, n_global=2, n_local=10, global_size=224, local_size=96, out_dim=65536)


def device_setup(batch: int = 0) -> Setup:
    """The setup for this machine's device (GPU: the reference recipe), with ``batch`` images if > 0."""
    s = GPU_SETUP if DEVICE.type == "cuda" else CPU_SETUP
    return replace(s, batch=batch or s.batch)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def random_batch(s: Setup, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.rand(s.n_global * s.batch, 1, s.global_size, s.global_size, generator=g).to(DEVICE),
            "local": torch.rand(s.n_local * s.batch, 1, s.local_size, s.local_size, generator=g).to(DEVICE)}


def matmul_gflops(dtype: torch.dtype, n: int, reps: int = 5) -> float:
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    for _ in range(2):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def ours(arch: str, precision: str, s: Setup, compile_backbones: bool = False) -> Step:
    cfg = PretrainConfig(arch=arch, global_size=s.global_size, local_size=s.local_size, n_local=s.n_local,
                         out_dim=s.out_dim, batch_size=s.batch, epochs=100, num_workers=0, precision=precision,
                         compile=compile_backbones)
    items = [{"image": torch.rand(1, s.global_size, s.global_size)} for _ in range(s.batch)]
    # only train_step is used: the run folder is never written (fit() is not called)
    trainer = Trainer(cfg, Path(tempfile.gettempdir()) / "xrayfm_bench_unused", items, show_progress=False)
    trainer.method.train()
    return trainer.train_step


class PeerHead(nn.Module):
    """The lightly-style DINO projection head (MLP, L2 norm, weight-normalised last layer)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                                 nn.Linear(2048, 256))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(256, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def peer(arch: str, amp: bool, s: Setup) -> Step:
    """One backbone call per crop, pairwise Python loss, per-parameter EMA, default AdamW."""
    spec = backbone_spec(arch)  # plain timm model: stock attention, no channels-last, default precision
    kwargs = {"dynamic_img_size": True} if spec.family == "vit" else {}
    backbone = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=0, **kwargs)
    student = nn.Sequential(backbone, PeerHead(backbone.num_features, s.out_dim)).to(DEVICE)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    center = torch.zeros(1, s.out_dim, device=DEVICE)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        nonlocal center
        views = [*batch["global"].chunk(s.n_global), *batch["local"].chunk(s.n_local)]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_out = [teacher(v).float() for v in views[:s.n_global]]
            s_out = [student(v).float() for v in views]
        q = [F.softmax((t - center) / 0.04, dim=-1) for t in t_out]
        logp = [F.log_softmax(o / 0.1, dim=-1) for o in s_out]
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


def lightly_step(arch: str, amp: bool, s: Setup) -> Step:
    """lightly 1.6's DINO pieces, assembled as its example does, on the same timm backbone."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    spec = backbone_spec(arch)
    kwargs = {"dynamic_img_size": True} if spec.family == "vit" else {}

    def make() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        bb = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=0, **kwargs)
        head = DINOProjectionHead(bb.num_features, 2048, 256, s.out_dim, freeze_last_layer=1)
        return bb.to(DEVICE), head.to(DEVICE)

    s_bb, s_head = make()
    t_bb, t_head = make()  # identical weights; weight-normed heads cannot be deep-copied
    deactivate_requires_grad(t_bb)
    deactivate_requires_grad(t_head)
    criterion = DINOLoss(output_dim=s.out_dim, warmup_teacher_temp_epochs=5).to(DEVICE)
    opt = torch.optim.Adam([*s_bb.parameters(), *s_head.parameters()], lr=1e-3)

    def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        views = [*batch["global"].chunk(s.n_global), *batch["local"].chunk(s.n_local)]
        update_momentum(s_bb, t_bb, m=0.996)
        update_momentum(s_head, t_head, m=0.996)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
            t_out = [t_head(t_bb(v).flatten(start_dim=1)) for v in views[:s.n_global]]
            s_out = [s_head(s_bb(v).flatten(start_dim=1)) for v in views]
        loss = criterion([t.float() for t in t_out], [o.float() for o in s_out], epoch=1)
        loss.backward()
        s_head.cancel_last_layer_gradients(current_epoch=1)
        opt.step()
        opt.zero_grad()
        return {"loss": loss.item()}

    return step


def step_seconds(step: Step, s: Setup, seed: int) -> float:
    batch = random_batch(s, seed)
    sync()
    t = time.perf_counter()
    step(batch)
    sync()
    return time.perf_counter() - t


def flops_per_image(arch: str, s: Setup) -> float:
    step = ours(arch, "fp32", s)
    with FlopCounterMode(display=False) as counter:
        step(random_batch(s, 0))
    return counter.get_total_flops() / s.batch


def variant_makers(arch: str, s: Setup, with_peer: bool = True,
                   compile_backbones: bool = False) -> dict[str, Callable[[], Step]]:
    """Every variant's step builder; the ``lightly_*`` ones only when lightly is installed."""
    makers: dict[str, Callable[[], Step]] = {
        "xrayfm_fp32": partial(ours, arch, "fp32", s), "xrayfm_bf16": partial(ours, arch, "bf16", s)}
    if compile_backbones:
        makers["xrayfm_bf16_compiled"] = partial(ours, arch, "bf16", s, True)
    if with_peer:
        makers.update({"peer_fp32": partial(peer, arch, False, s), "peer_bf16": partial(peer, arch, True, s)})
    try:
        import lightly  # noqa: F401
    except ImportError:
        return makers
    makers.update({"lightly_fp32": partial(lightly_step, arch, False, s),
                   "lightly_bf16": partial(lightly_step, arch, True, s)})
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


def _probe(spec: str) -> None:
    """Child process of :func:`memory_probe`: build one variant, run 3 steps, print its memory as JSON.
    ``VmHWM`` is the high-water mark of this process's own address space (``getrusage``'s maxrss
    would include the parent's, inherited at fork)."""
    job = json.loads(spec)
    s = Setup(**job["setup"])
    step = variant_makers(job["arch"], s, compile_backbones=job["compile"])[job["name"]]()
    batch = random_batch(s, 0)
    built = _status_mb("VmRSS")
    for _ in range(3):
        step(batch)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "step_rss_mb": round(peak - built, 1)}))


def memory_probe(arch: str, name: str, s: Setup, threads: int, compile_backbones: bool) -> dict[str, float]:
    """Peak memory of one variant's training. CPU: in a fresh process (CPU has no allocator
    high-water mark like CUDA's), ``peak_rss_mb`` = the process's high-water mark over 3 steps,
    ``step_rss_mb`` = that minus the memory held once model, optimiser and batch exist. GPU: the
    caching allocator's high-water mark over 3 steps of this variant alone, ``peak_gpu_mb`` from
    before it was built, ``step_gpu_mb`` above the built model, optimiser and batch."""
    if DEVICE.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step = variant_makers(arch, s, compile_backbones=compile_backbones)[name]()
        batch = random_batch(s, 0)
        built = torch.cuda.memory_allocated()
        for _ in range(3):
            step(batch)
        peak = torch.cuda.max_memory_allocated()
        del step, batch
        gc.collect()
        torch.cuda.empty_cache()
        return {"peak_gpu_mb": round((peak - base) / 2**20, 1), "step_gpu_mb": round((peak - built) / 2**20, 1)}
    job = json.dumps({"arch": arch, "name": name, "setup": asdict(s), "compile": compile_backbones})
    out = subprocess.run([sys.executable, __file__, "--probe", job, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bf16_peak_tflops() -> float | None:
    """The GPU's dense bf16 datasheet peak, when it is one we know."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--archs", default="vit_tiny_patch16,resnet18")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = torch's default)")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="variants to time: fp32 alone where the CPU has no fast bf16 (emulated bf16 is slow)")
    ap.add_argument("--batch", type=int, default=0, help="images per step (0 = the setup's: 16 CPU, 64 GPU)")
    ap.add_argument("--compile", action="store_true", help="also time xrayfm bf16 with torch.compile'd backbones")
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the re-implementation of lightly's example")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure each variant's peak memory")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        _probe(args.probe)
        return
    torch.manual_seed(0)
    cuda = DEVICE.type == "cuda"
    s = device_setup(args.batch)
    peak_tflops = bf16_peak_tflops() if cuda else None
    result: dict[str, object] = {
        "setup": s.text(), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "method": f"variants interleaved step by step for {args.rounds} rounds after 2 warm-up steps; "
                  "best = fastest step (least disturbed by other jobs), median = median step",
        "threads": torch.get_num_threads(), "cpu_fast_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "bf16_peak_tflops_datasheet": peak_tflops,
        "load_avg_1min_before": os.getloadavg()[0],
        "versions": versions(), "archs": {}}
    n_mm = 8192 if cuda else 2048
    for arch in args.archs.split(","):
        gflop = flops_per_image(arch, s) / 1e9
        makers = {name: make for name, make in
                  variant_makers(arch, s, with_peer=args.peer, compile_backbones=args.compile).items()
                  if name.split("_")[1] in args.precisions.split(",")}
        if not any(name.startswith("lightly") for name in makers):
            print("lightly is not installed (pip install -e '.[bench]'): measuring the re-implementation only")
        row: dict[str, object] = {"gflop_per_image": round(gflop, 3)}
        if args.memory:  # before the timing, so each variant is alone on the GPU
            mem = {name: memory_probe(arch, name, s, torch.get_num_threads(), args.compile) for name in makers}
        steps = {name: make() for name, make in makers.items()}
        for name, step in steps.items():  # warm-up: allocator, oneDNN primitives, compilation
            step_seconds(step, s, 0)
            step_seconds(step, s, 1)
        times: dict[str, list[float]] = {name: [] for name in steps}
        peaks: list[float] = []
        bf16_peaks: list[float] = []
        for r in range(args.rounds):
            peaks.append(matmul_gflops(torch.float32, n_mm))
            if cuda:
                bf16_peaks.append(matmul_gflops(torch.bfloat16, n_mm))
            for name, step in steps.items():
                times[name].append(step_seconds(step, s, 2 + r))
        floor = max(peaks) / gflop
        row.update({"matmul_fp32_gflops_best": round(max(peaks), 1), "fp32_floor_images_per_s": round(floor, 2)})
        if cuda:
            row["matmul_bf16_gflops_best"] = round(max(bf16_peaks), 1)
        for name, ts in times.items():
            best, median = s.batch / min(ts), s.batch / statistics.median(ts)
            v: dict[str, object] = {"images_per_s_best": round(best, 2), "images_per_s_median": round(median, 2),
                                    "pct_of_fp32_floor_best": round(100 * best / floor, 1)}
            line = f"{arch:18s} {name:20s} best {best:8.2f} median {median:8.2f} images/s"
            if cuda:
                v["pct_of_bf16_matmul_median"] = round(100 * median * gflop / max(bf16_peaks), 1)
                if peak_tflops:
                    v["mfu_pct_median"] = round(100 * median * gflop / (peak_tflops * 1e3), 1)
                    line += f" MFU {v['mfu_pct_median']:5.1f}%"
            else:
                line += f" ({100 * best / floor:5.1f}% of fp32 floor)"
            if args.memory:
                v.update(mem[name])
                line += " " + json.dumps(mem[name])
            row[name] = v
            print(line, flush=True)
        for ref in ("peer_fp32", "lightly_fp32", "lightly_bf16"):
            if ref in times:
                base = s.batch / statistics.median(times[ref])
                row[f"median_speedup_vs_{ref}"] = {
                    name: round(s.batch / statistics.median(ts) / base, 2) for name, ts in times.items()}
        result["archs"][arch] = row  # type: ignore[index]
        del steps
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result["load_avg_1min_after"] = os.getloadavg()[0]
        atomic_write_text(args.out, json.dumps(result, indent=2))  # after each arch: a cut-off run keeps them
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
