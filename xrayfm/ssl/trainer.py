"""The pretraining loop: one readable loop over any registered SSL method.

Runs in one process or under ``torchrun`` (DDP: gloo on CPU, nccl on GPU). Everything a run
produces lives in its output folder: ``config.yaml`` + ``run.json`` (resolved config, versions,
seed, data query), ``checkpoint.pth`` (student, teacher, optimiser, scaler, centre, data
position, RNG states; written atomically every ``checkpoint_every`` steps and at each epoch
end), ``metrics.jsonl`` (+ TensorBoard events when available) and at the end the exported
``backbone.safetensors`` + ``model_card.json``. Starting again on the same folder resumes.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from xrayfm.config import ConfigError, atomic_write_text, to_dict, write_run_record
from xrayfm.models.backbones import ResNetBackbone
from xrayfm.models.card import CARD_NAME, export_backbone
from xrayfm.models.runtime import autocast, resolve_precision
from xrayfm.ssl import anatomy as _anatomy  # noqa: F401  (registers the "anatomy" method)
from xrayfm.ssl import dino as _dino  # noqa: F401  (registers the "dino" method)
from xrayfm.ssl.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.multicrop import EpochSampler, MultiCropIterableDataset, MultiCropMapDataset
from xrayfm.ssl.numerics import NonFiniteGuard, check_state_finite, grads_finite, guard_tiny_strided_convs
from xrayfm.ssl.registry import Progress, SSLMethod, build_method
from xrayfm.ssl.schedules import warmup_cosine

# Keys that may change between a checkpoint and its resumption without changing the result
# (epochs may grow: the schedules then stretch, as in the DINO reference).
_RESUMABLE_CHANGES = {"epochs", "max_steps", "num_workers", "checkpoint_every", "log_every", "compile"}


@dataclass
class TrainSummary:
    steps: int
    total_steps: int
    loss: float
    images_per_s: float
    out_dir: str
    resumed_from: int | None

    def line(self) -> str:
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""
        return (f"pretrained {self.steps}/{self.total_steps} steps{resumed}: loss {self.loss:.4f}, "
                f"{self.images_per_s:.1f} images/s; backbone in {self.out_dir}")


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def make_optimizer(module: nn.Module, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum 0.9) with two groups: no weight decay on biases and norm
    parameters; fused when possible. The trainer sets lr and weight decay every step."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, foreach=True)
    try:
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=0.0, foreach=True)


class Trainer:
    """Owns the method, optimiser and data of one run; :meth:`fit` trains to the end or ``max_steps``."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | Path, dataset: Dataset | IterableDataset,
                 n_images: int | None = None, resume: bool | None = None, show_progress: bool = True,
                 data_summary: dict[str, Any] | None = None,
                 monitor: Callable[[nn.Module], dict[str, float]] | None = None) -> None:
        cfg.validate()
        self.cfg, self.out, self.dataset = cfg, Path(out_dir), dataset
        self.monitor = monitor  # called on the trained backbone (eval mode, no grad) after each epoch
        self.show_progress = show_progress
        if resume and not (self.out / CHECKPOINT_NAME).is_file():
            raise ConfigError(f"resume requested but {self.out / CHECKPOINT_NAME} does not exist; "
                              "drop --resume to start fresh")
        self.rank, self.world, self.device = setup_distributed()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.method: SSLMethod = build_method(cfg).to(self.device)
        guard_tiny_strided_convs(self.method)  # CPU bf16 weight gradients of tiny maps (issue #4)
        self.nonfinite = NonFiniteGuard()
        is_cnn = isinstance(self.method.trained_backbone(), ResNetBackbone)
        if self.world > 1 and is_cnn and self.device.type == "cuda":
            self.method.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.method.student)
            self.method.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.method.teacher)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer = make_optimizer(self.method.student, cfg.optimizer)
        self.student: nn.Module = self.method.student
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.method.student, device_ids=ids)
        if cfg.compile:  # static shapes: one graph per crop size beats a dynamic-shape graph
            self.method.student.backbone.compile(dynamic=False)
            self.method.teacher.backbone.compile(dynamic=False)
        self.transform = self.method.make_transform()
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.n_images = n_images if n_images is not None else self._source_len()
        self.data_summary = {"n_images": self.n_images, "lake": cfg.lake, "split": cfg.split,
                             "where": cfg.where, **(data_summary or {})}
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.resumed_from = self._maybe_resume()
        if self.resumed_from is None:
            torch.manual_seed(cfg.seed + 1 + self.rank)  # per-rank stochastic depth from here on

    # -- data ------------------------------------------------------------------------------
    def _source_len(self) -> int | None:
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def _steps_per_epoch(self) -> int:
        per_batch = self.cfg.batch_size
        if isinstance(self.dataset, IterableDataset):
            n = self._source_len()  # an iterable source shards itself: this rank's length
            if n is None and self.cfg.steps_per_epoch is None:
                raise ConfigError("the dataset has no len(); set steps_per_epoch in the config")
            # each DataLoader worker batches its own share and drops its incomplete last batch
            workers = max(1, self.cfg.num_workers)
            steps = self.cfg.steps_per_epoch or workers * ((n // workers) // per_batch)
        else:
            n = len(self.dataset)  # type: ignore[arg-type]
            available = n // (per_batch * self.world)
            steps = self.cfg.steps_per_epoch or available
            if steps > available:
                raise ConfigError(f"steps_per_epoch {steps} needs more than the {n} images of the dataset; "
                                  f"at most {available} fit")
        if self.world > 1:  # every rank must take the same number of steps
            t = torch.tensor([steps], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            steps = int(t.item())
        if steps < 1:
            raise ConfigError(f"the dataset ({n} images per process, split over "
                              f"{max(1, self.cfg.num_workers)} data workers) is smaller than one batch of "
                              f"{per_batch} per worker; lower batch_size or num_workers, or add images")
        return steps

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        self.method.set_epoch(epoch)
        common: dict[str, Any] = {"batch_size": cfg.batch_size, "drop_last": True,
                                  "collate_fn": self.method.collate, "num_workers": cfg.num_workers,
                                  "pin_memory": self.device.type == "cuda",
                                  "generator": torch.Generator()}  # keeps the global RNG untouched
        if isinstance(self.dataset, IterableDataset):
            data = MultiCropIterableDataset(self.dataset, self.transform, cfg.seed)
            data.set_epoch(epoch)
            it = iter(DataLoader(data, **common))
            for _ in range(skip):  # consumed before an interruption: same items, dropped
                next(it)
            return it
        sampler = EpochSampler(len(self.dataset), cfg.seed, self.rank, self.world)  # type: ignore[arg-type]
        sampler.set_epoch(epoch, skip * cfg.batch_size)
        return iter(DataLoader(MultiCropMapDataset(self.dataset, self.transform), sampler=sampler, **common))

    # -- checkpoints ----------------------------------------------------------------------
    def _maybe_resume(self) -> int | None:
        path = self.out / CHECKPOINT_NAME
        if not path.is_file():
            return None
        ckpt = load_checkpoint(path)
        saved, now = ckpt["config"], to_dict(self.cfg)
        # a key newer than the checkpoint counts as its default, which reproduces the old behaviour
        defaults = to_dict(PretrainConfig())
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k, defaults[k]) != now[k])
        if changed:
            raise ConfigError(f"{path} was made with different {', '.join(changed)}; use the same "
                              "settings to resume or choose a new output folder")
        if ckpt["world"] != self.world:
            raise ConfigError(f"{path} was made with {ckpt['world']} processes, not {self.world}; "
                              "resume with the same number of processes")
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.step_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        set_rng_state(ckpt["rng"][self.rank])
        return self.step

    def _save(self) -> None:
        check_state_finite(self.method.state_dict(), self.step)
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state())
        if self.rank != 0:
            return
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch, "rng": states, "world": self.world,
            "config": to_dict(self.cfg),
        })

    # -- one step -------------------------------------------------------------------------
    def _schedules(self) -> tuple[float, float, float]:
        c, s, total = self.cfg, self.step, self.total_steps
        lr = warmup_cosine(s, total, c.base_lr * c.batch_size * self.world / 256, c.min_lr,
                           round(c.warmup_epochs * self.steps_per_epoch))
        wd = warmup_cosine(s, total, c.weight_decay, c.weight_decay_end)
        momentum = warmup_cosine(s, total, c.momentum_teacher, 1.0)
        return lr, wd, momentum

    def _forward(self, batch: dict[str, torch.Tensor], progress: Progress,
                 dtype: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(self.device, dtype):
            return self.method.loss(self.student, batch, progress)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step + teacher update; returns the step's statistics."""
        progress = Progress(self.step, self.epoch, self.steps_per_epoch, self.total_steps)
        lr, wd, momentum = self._schedules()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = 0.0 if group.get("no_decay") else wd
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        center = {k: v.clone() for k, v in self.method.state_dict().items() if k.endswith("center")}
        loss, stats = self._forward(batch, progress, self.amp_dtype)
        if not torch.isfinite(loss) and self.amp_dtype is not None:
            warnings.warn(f"non-finite loss under {self.amp_dtype} at step {self.step}; step redone in fp32",
                          stacklevel=2)
            self.method.load_state_dict(center, strict=False)  # undo the centre update of the bad pass
            loss, stats = self._forward(batch, progress, None)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}; lower base_lr or "
                                     "clip_grad, or check the data for constant images")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.method.student.parameters(), self.cfg.clip_grad, foreach=True)
        self.method.after_backward(progress)
        # fp16's GradScaler skips inf steps by design (and lowers its scale); elsewhere we skip them
        if self.scaler.is_enabled() or self.nonfinite.check(grads_finite(self.method.student.parameters()),
                                                            self.step):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.update_teacher(momentum)
        self.step += 1
        self.step_in_epoch += 1
        return {"loss": loss.item(), "lr": lr, "wd": wd, "momentum": momentum,
                "skipped_steps": float(self.nonfinite.skipped), **{k: float(v) for k, v in stats.items()}}

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> TrainSummary:
        cfg, is_main = self.cfg, self.rank == 0
        last = max(self.step, min(self.total_steps, self.total_steps if cfg.max_steps is None else cfg.max_steps))
        card_path = self.out / CARD_NAME
        if self.step >= last and card_path.is_file():  # nothing left to do: report the finished run
            loss = json.loads(card_path.read_text()).get("metrics", {}).get("loss", float("nan"))
            return TrainSummary(self.step, self.total_steps, loss, 0.0, str(self.out), self.resumed_from)
        if is_main:
            write_run_record(self.out, cfg, seed=cfg.seed, extra={
                "data": self.data_summary, "world_size": self.world, "device": str(self.device),
                "precision": str(self.amp_dtype or "fp32"), "steps_per_epoch": self.steps_per_epoch})
        logger = _MetricsLog(self.out, self.resumed_from) if is_main else None
        stats: dict[str, float] = {"loss": float("nan")}
        images, t0, speed = 0, time.perf_counter(), 0.0
        self.method.train()
        with _progress_bar(is_main and self.show_progress, self.step, last) as bar:
            while self.step < last:
                batches = self._batches(self.epoch, self.step_in_epoch)
                while self.step_in_epoch < self.steps_per_epoch and self.step < last:
                    batch = next(batches, None)
                    if batch is None:
                        raise ConfigError(f"the data ended after {self.step_in_epoch} batches of epoch "
                                          f"{self.epoch}, expected {self.steps_per_epoch}; set "
                                          "steps_per_epoch lower")
                    stats = self.train_step(batch)
                    images += cfg.batch_size * self.world
                    if self.step % cfg.log_every == 0 or self.step == last:
                        speed = images / (time.perf_counter() - t0)
                        images, t0 = 0, time.perf_counter()
                        self._log(logger, stats, speed)
                    if (self.step % cfg.checkpoint_every == 0 and self.step < last
                            and self.step_in_epoch < self.steps_per_epoch):
                        self._save()  # the epoch end and the last step save below
                    bar(self.step, stats)
                if self.step_in_epoch == self.steps_per_epoch:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    self._run_monitor(logger)
                self._save()
        if is_main:
            if logger is not None:
                logger.close()
            export_backbone(self.method.trained_backbone(), self.out, cfg.global_size, extra={
                "method": cfg.method, "training_data": self.data_summary, "config": to_dict(cfg),
                "metrics": stats, "steps": self.step, "total_steps": self.total_steps,
                "finished": self.step >= self.total_steps})
        return TrainSummary(self.step, self.total_steps, stats["loss"], speed, str(self.out),
                            self.resumed_from)

    def _run_monitor(self, logger: _MetricsLog | None) -> None:
        if self.monitor is None or logger is None:
            return
        backbone = self.method.trained_backbone()
        backbone.eval()
        with torch.no_grad():
            result = self.monitor(backbone)
        self.method.train()
        logger.write({"step": self.step, "epoch": self.epoch, **result}, name="monitor")

    def _log(self, logger: _MetricsLog | None, stats: dict[str, float], speed: float) -> None:
        if logger is None:
            return
        record = {"step": self.step, "epoch": self.epoch, "images_per_s": round(speed, 2), **stats}
        logger.write(record)
        warning = self.method.collapse_warning(stats)
        if warning and warning != logger.last_warning:
            warnings.warn(f"step {self.step}: {warning}", stacklevel=2)
        logger.last_warning = warning


class _MetricsLog:
    """``metrics.jsonl`` (per logged step), ``monitor.jsonl`` (per epoch, when a monitor is given)
    and TensorBoard scalars of both (when tensorboard is installed)."""

    def __init__(self, out: Path, resumed_from: int | None) -> None:
        self.last_warning: str | None = None
        self.files = {name: self._open(out / f"{name}.jsonl", resumed_from) for name in ("metrics", "monitor")}
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb: Any = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tb = None

    @staticmethod
    def _open(path: Path, resumed_from: int | None) -> Any:
        if path.exists():  # drop records the resumed run will write again
            keep = [ln for ln in path.read_text().splitlines()
                    if ln and resumed_from is not None and json.loads(ln)["step"] <= resumed_from]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        return path.open("a")

    def write(self, record: dict[str, Any], name: str = "metrics") -> None:
        self.files[name].write(json.dumps(record) + "\n")
        self.files[name].flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


class _progress_bar:
    """Rich progress bar with ETA and the latest loss / lr / momentum / entropy / KL."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 disable=not enabled)
        self.task = self.progress.add_task("pretrain", total=total, completed=start, info="")

    def __enter__(self) -> _progress_bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, step: int, s: dict[str, float]) -> None:
        info = (f"loss {s['loss']:.3f} lr {s['lr']:.2e} m {s['momentum']:.4f} "
                f"H {s.get('teacher_entropy', float('nan')):.2f} KL {s.get('kl', float('nan')):.3f}")
        self.progress.update(self.task, completed=step, info=info)


def train(cfg: PretrainConfig, out_dir: str | Path, dataset: Dataset | IterableDataset,
          n_images: int | None = None, resume: bool | None = None, show_progress: bool = True,
          data_summary: dict[str, Any] | None = None,
          monitor: Callable[[nn.Module], dict[str, float]] | None = None) -> TrainSummary:
    """Pretrain on ``dataset`` (items ``{"image": (1, H, W) in [0, 1]}``) into ``out_dir``.

    ``resume``: None continues from ``out_dir/checkpoint.pth`` when it exists, True requires it.
    ``monitor`` (e.g. :func:`xrayfm.tasks.evaluate.knn_monitor`) is logged after each epoch.
    """
    return Trainer(cfg, out_dir, dataset, n_images, resume, show_progress, data_summary, monitor).fit()
