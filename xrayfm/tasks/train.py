"""Training and running heads on a backbone: feature-cache path and backbone-in-the-loop path.

* Cache path (default): the frozen backbone runs once over the resized training images
  (:mod:`xrayfm.tasks.features`); every epoch then costs only the head.
* Backbone path (``augment`` or ``unfreeze``): every step runs the backbone on a (randomly
  cropped and flipped, when ``augment``) batch; with ``unfreeze = N`` the last N ViT blocks or
  ResNet stages (``-1``: the whole backbone) are fine-tuned at ``lr * backbone_lr_scale``.
* ``dihedral``: each item is seen under a random rotation/mirror (D4, :func:`dihedral_item`)
  every epoch; in the loop drawn after ``augment``, on the cache path from a cache holding the
  features of all 8 transforms of every image (8 backbone passes, 8x the cache memory).
* ``device`` / ``precision``: the head (and backbone) train on the GPU when there is one; the
  head's forward pass runs under bf16 autocast where bf16 is fast (GPU, AMX/AVX-512 CPU: about
  1.8x faster decoder steps on a CPU thread), its loss in fp32. The cache stays in CPU memory.
  Prediction and evaluation run in fp32.

A head bundle folder holds ``head.safetensors``, ``head.json`` (head name and arguments, task,
image size, backbone card, training config, history) and, when the backbone was fine-tuned, the
fine-tuned backbone as an exported bundle in ``backbone/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xrayfm.config import atomic_write_bytes, atomic_write_text
from xrayfm.models.backbones import POOLINGS
from xrayfm.models.heads import (
    POOLED_NORMS,
    create_head,
    head_info,
    head_pool,
    head_reads_image,
    input_standardizer,
)
from xrayfm.models.runtime import (
    AUTOCAST_PRECISIONS,
    autocast,
    module_device,
    resolve_bf16,
    resolve_device,
)
from xrayfm.tasks.base import HeadTask, get_task
from xrayfm.tasks.data import (
    DIHEDRAL_ELEMENTS,
    LabeledImage,
    augment_item,
    dihedral_item,
    images_tensor,
    label_subset,
    resize_item,
)
from xrayfm.tasks.detect import DetectTask
from xrayfm.tasks.features import backbone_features, batched, compute_features
from xrayfm.tasks.tta import tta_elements, tta_mean

HEAD_WEIGHTS = "head.safetensors"
HEAD_CARD = "head.json"


@dataclass
class HeadTrainConfig:
    """How one head is trained."""

    task: str = "classify"
    head: str | None = None          # registered head name; None = the task's default
    num_classes: int | None = None   # classification only; None = the 11 body regions
    head_width: int = 64             # channels of the dense heads' decoder
    feature_norm: str = "standardize"  # pooled heads' input: train-set "standardize" or per-item "layernorm"
    pool: str = "auto"               # pooled heads' embedding: "final", "multilevel", "auto" (per family)
    out_stride: int | None = None    # dense heads' output stride 4, 2 or 1; None: the task's (metal 2, else 4)
    image_skip: bool | None = None   # dense heads also read the input image; None: the task's (metal yes)
    img_size: int = 224
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-2                 # one-cycle peak; rod test: Dice 0.73 at 1e-2, 0.45 at 1e-3
    weight_decay: float = 1e-4
    augment: bool = False
    dihedral: bool = False           # random rot90/mirror per item; on the cache path 8x cache memory
    unfreeze: int = 0                # last N blocks/stages fine-tuned; -1 = all
    backbone_lr_scale: float = 0.1
    label_fraction: float = 1.0      # <= 1: fraction per class; > 1: items per class
    tune_threshold: bool = True      # heads train: pick the segment/detect threshold on the val split
    match_px: float = 10.0           # detect: screw matching radius (image px) of val tuning and metrics
    device: str = "auto"             # auto (GPU when there is one) | cpu | cuda | cuda:N
    precision: str = "auto"          # head forward: auto (bf16 where fast) | bf16 | fp32
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.img_size >= 32 and self.img_size % 32 == 0, f"img_size must be a multiple of 32, got {self.img_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.unfreeze >= -1, f"unfreeze must be >= 0 blocks, or -1 for all, got {self.unfreeze}"),
            (self.label_fraction > 0, f"label_fraction must be > 0, got {self.label_fraction}"),
            (self.match_px > 0, f"match_px must be a positive distance in image pixels, got {self.match_px}"),
            (self.out_stride in (None, 1, 2, 4), f"out_stride must be 1, 2 or 4, got {self.out_stride}"),
            (self.feature_norm in POOLED_NORMS,
             f"feature_norm must be one of {', '.join(POOLED_NORMS)}, got {self.feature_norm!r}"),
            (self.pool in ("auto", *POOLINGS), f"pool must be auto or one of {', '.join(POOLINGS)}, got {self.pool!r}"),
            (self.precision in AUTOCAST_PRECISIONS,
             f"precision must be one of {', '.join(AUTOCAST_PRECISIONS)}, got {self.precision!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def in_loop(self) -> bool:
        """Whether the backbone runs every step (``augment`` or ``unfreeze``) instead of once into a cache."""
        return self.augment or self.unfreeze != 0

    @property
    def cache_views(self) -> int:
        """Backbone passes over the training images into the feature cache: 0 in the loop, 8 with
        ``dihedral`` (one per D4 element), else 1."""
        return 0 if self.in_loop else DIHEDRAL_ELEMENTS if self.dihedral else 1


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's sequential blocks, input to output (ViT blocks, ResNet stages)."""
    model = getattr(backbone, "model", backbone)
    if hasattr(model, "blocks"):
        return list(model.blocks)
    stages = [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    if not stages:
        raise ValueError(f"cannot find blocks or stages in backbone {type(model).__name__}; use unfreeze 0 or -1")
    return stages


def set_trainable(backbone: nn.Module, unfreeze: int) -> list[nn.Parameter]:
    """Freeze the backbone except its last ``unfreeze`` blocks (and the final norm); -1 = all."""
    for p in backbone.parameters():
        p.requires_grad_(unfreeze == -1)
    if unfreeze > 0:
        model = getattr(backbone, "model", backbone)
        for block in backbone_blocks(backbone)[-unfreeze:]:
            block.requires_grad_(True)
        if hasattr(model, "norm"):
            model.norm.requires_grad_(True)
    return [p for p in backbone.parameters() if p.requires_grad]


def head_arguments(task: HeadTask, cfg: HeadTrainConfig) -> dict[str, Any]:
    """Keyword arguments the head of ``task`` is built with (saved in the head bundle); dense heads
    take ``cfg.out_stride``/``cfg.image_skip``, or the task's defaults where they are None."""
    dense = {"width": cfg.head_width,
             "out_stride": task.default_out_stride if cfg.out_stride is None else cfg.out_stride,
             "image_skip": task.default_image_skip if cfg.image_skip is None else cfg.image_skip}
    return task.head_kwargs() | (dense if task.input_kind == "dense"
                                 else {"feature_norm": cfg.feature_norm, "pool": cfg.pool})


def _progress_noop(_: int) -> None:
    return None


def train_head(backbone: nn.Module, items: Sequence[LabeledImage], cfg: HeadTrainConfig,
               progress: Callable[[int], None] | None = None) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a head for ``cfg.task`` on the labelled ``items`` (the ``cfg.label_fraction`` subset,
    stratified by region for classification); returns the head and per-epoch mean losses.

    ``progress(n)`` is called with the number of images processed (feature pass and epochs).
    ``cfg.pool`` "auto" is resolved in place to the backbone family's pooling, so the config
    saved with the head names the embedding it reads; ``cfg.precision`` likewise to what ran
    (bf16 or fp32: pooled heads on the cache always run fp32), and a dense head's ``out_stride`` /
    ``image_skip`` left at None to the task's defaults. The head and backbone are left on
    ``cfg.device``.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    task = get_task(cfg.task, cfg.num_classes)
    # a pooled head on cached features is a few small matrix products that bf16 would only round
    amp = None if task.input_kind == "pooled" and not cfg.in_loop else resolve_bf16(cfg.precision, device)
    cfg.precision = "bf16" if amp else "fp32"
    cfg.pool = backbone.resolve_pool(cfg.pool)
    labelled = [it for it in items if task.has_label(it)]
    if not labelled:
        raise ValueError(f"no training images carry a {cfg.task} label; check the labels file and the split")
    labelled = label_subset(labelled, cfg.label_fraction, cfg.seed,
                            key="region_index" if task.name == "classify" else None)
    progress = progress or _progress_noop
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head_name = cfg.head or task.default_head
    head_kwargs = head_arguments(task, cfg)
    if task.input_kind == "dense":  # the saved config names the grid and input the head has
        cfg.out_stride, cfg.image_skip = head_kwargs["out_stride"], head_kwargs["image_skip"]
    head = create_head(head_name, backbone.embed_dim, backbone.dense_channels, backbone.dense_strides,
                       **head_kwargs).to(device)
    backbone.to(device)
    if head.task != task.head_task:  # type: ignore[attr-defined]
        raise ValueError(f"head {head_name!r} is for task {head.task!r}, not {task.name!r}")
    task.bind_head(head)
    bb_params = set_trainable(backbone, cfg.unfreeze)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": cfg.lr}]
    if bb_params:
        groups.append({"params": bb_params, "lr": cfg.lr * cfg.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(len(labelled) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.1)
    fit = _fit_in_loop if cfg.in_loop else _fit_on_cache
    history = fit(backbone, head, task, labelled, cfg, HeadStepper(opt, sched, device, amp), rng, progress)
    task.finish_head(head, labelled)
    set_trainable(backbone, 0)
    backbone.eval()
    head.eval()
    return head, history


@dataclass
class HeadStepper:
    """Optimiser, schedule, device and autocast dtype of one head's training."""

    opt: torch.optim.Optimizer
    sched: Any
    device: torch.device
    amp: torch.dtype | None

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.amp)

    def step(self, task: HeadTask, out: torch.Tensor, batch: list[LabeledImage]) -> float:
        """Loss (fp32) of ``out`` against ``batch``'s targets, one optimiser and learning-rate step;
        returns the loss value."""
        targets = {k: v.to(self.device, non_blocking=True) for k, v in task.targets(batch).items()}
        loss = task.loss(out.float(), targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.item()


def _view_batches(items: list[LabeledImage], views: int,
                  batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(ids, images)`` batches of all items under D4 element 0, then 1, ... ``views - 1``:
    cache row ``k * len(items) + i`` is item ``i`` under element ``k``."""
    ids = [it.image_id for it in items]
    for k in range(views):
        yield from batched(ids, images_tensor([dihedral_item(it, k) for it in items]), batch_size)


def _fit_on_cache(backbone: nn.Module, head: nn.Module, task: HeadTask, items: list[LabeledImage],
                  cfg: HeadTrainConfig, stepper: HeadStepper, rng: np.random.Generator,
                  progress: Callable[[int], None]) -> list[dict[str, float]]:
    """Frozen backbone once per view into a cache, then epochs of the head alone; with
    ``dihedral`` every epoch draws one of the 8 cached transforms per item (targets to match)."""
    size = (cfg.img_size, cfg.img_size)
    base = [resize_item(it, *size) for it in items]
    n, views = len(base), cfg.cache_views
    cache = compute_features(backbone, _view_batches(base, views, cfg.batch_size), task.input_kind,
                             progress=progress, pool=head_pool(head), image=head_reads_image(head))
    if (norm := input_standardizer(head)) is not None:
        norm.fit(cache.feats[0])
    history = []
    head.train()
    for epoch in range(cfg.epochs):
        losses = []
        # without dihedral nothing is drawn, so the seed's permutations stay as before
        view = torch.from_numpy(rng.integers(0, views, n)) if cfg.dihedral else torch.zeros(n, dtype=torch.long)
        for idx in torch.from_numpy(rng.permutation(n)).split(cfg.batch_size):
            ks = view[idx]
            with stepper.autocast():
                out = task.run_head(head, cache.batch(ks * n + idx, stepper.device), size)
            batch = [dihedral_item(base[i], k) for i, k in zip(idx.tolist(), ks.tolist())]
            losses.append(stepper.step(task, out, batch))
            progress(len(idx))
        history.append({"epoch": epoch, "loss": float(np.mean(losses))})
    return history


def _fit_in_loop(backbone: nn.Module, head: nn.Module, task: HeadTask, items: list[LabeledImage],
                 cfg: HeadTrainConfig, stepper: HeadStepper, rng: np.random.Generator,
                 progress: Callable[[int], None]) -> list[dict[str, float]]:
    """Backbone every step on the (augmented, then dihedrally transformed) batch."""
    size = (cfg.img_size, cfg.img_size)
    base = [resize_item(it, *size) for it in items]
    if (norm := input_standardizer(head)) is not None:  # un-augmented images, starting backbone
        norm.fit(compute_features(backbone, _view_batches(base, 1, cfg.batch_size), task.input_kind,
                                  pool=head_pool(head)).feats[0])
    history = []
    head.train()
    backbone.eval()  # frozen parts keep their normalisation statistics
    if cfg.unfreeze == -1:
        backbone.train()
    elif cfg.unfreeze > 0:
        for block in backbone_blocks(backbone)[-cfg.unfreeze:]:
            block.train()
    for epoch in range(cfg.epochs):
        losses = []
        for idx in np.array_split(rng.permutation(len(base)), int(np.ceil(len(base) / cfg.batch_size))):
            batch = [augment_item(base[i], rng) if cfg.augment else base[i] for i in idx]
            if cfg.dihedral:
                ks = rng.integers(0, DIHEDRAL_ELEMENTS, len(batch)).tolist()
                batch = [dihedral_item(it, k) for it, k in zip(batch, ks)]
            x = images_tensor(batch).to(stepper.device, non_blocking=True)
            with stepper.autocast():
                with torch.set_grad_enabled(cfg.unfreeze != 0):
                    feats = backbone_features(backbone, x, task.input_kind, head_pool(head), head_reads_image(head))
                out = task.run_head(head, feats, size)
            losses.append(stepper.step(task, out, batch))
            progress(len(idx))
        history.append({"epoch": epoch, "loss": float(np.mean(losses))})
    return history


@torch.no_grad()
def predict_items(backbone: nn.Module, head: nn.Module, task: HeadTask, items: Sequence[LabeledImage],
                  img_size: int, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None, soft: bool = False,
                  tta: str = "none") -> list[Any]:
    """Task predictions for ``items``, in each item's own pixel frame (``soft``: before the
    decision threshold, :meth:`HeadTask.predict_soft`; ``tta``: test-time augmentation mode,
    :mod:`xrayfm.tasks.tta`)."""
    predict = task.predict_soft if soft else task.predict
    elements = tta_elements(tta)
    backbone.eval()
    head.eval()
    device = module_device(backbone)
    head.to(device)
    size = (img_size, img_size)
    vectors = {"out": getattr(head, "vector_channels", ())}

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = backbone_features(backbone, x, task.input_kind, head_pool(head), head_reads_image(head))
        return {"out": task.run_head(head, feats, size)}

    preds: list[Any] = []
    for i in range(0, len(items), batch_size):
        chunk = list(items[i:i + batch_size])
        x = images_tensor([resize_item(it, *size) for it in chunk]).to(device)
        out = run(x)["out"] if elements == (0,) else tta_mean(run, x, elements, vectors)["out"]
        preds += predict(out, chunk, size)
        if progress is not None:
            progress(len(chunk))
    return preds


def save_head_bundle(out_dir: str | Path, head: nn.Module, cfg: HeadTrainConfig, backbone: nn.Module,
                     backbone_card: dict[str, Any], history: list[dict[str, float]],
                     head_kwargs: dict[str, Any]) -> Path:
    """Write a head bundle (and the fine-tuned backbone when ``cfg.unfreeze`` != 0)."""
    from safetensors.torch import save

    out = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_bytes(out / HEAD_WEIGHTS, save(state))
    finetuned = cfg.unfreeze != 0
    if finetuned:
        from xrayfm.models.card import export_backbone

        export_backbone(backbone, out / "backbone", cfg.img_size,  # type: ignore[arg-type]
                        extra={k: v for k, v in backbone_card.items() if k in ("method", "config")}
                        | {"fine_tuned_from": backbone_card.get("source", backbone_card.get("weights_sha256"))})
    card = {
        "head": head.head_name, "task": cfg.task, "head_kwargs": head_kwargs,  # type: ignore[attr-defined]
        "img_size": cfg.img_size, "train_config": asdict(cfg), "history": history,
        "embed_dim": backbone.embed_dim, "dense_channels": list(backbone.dense_channels),
        "dense_strides": list(backbone.dense_strides),
        "backbone": {k: backbone_card.get(k) for k in ("arch", "method", "weights_sha256", "source")},
        "fine_tuned_backbone": "backbone" if finetuned else None,
    }
    atomic_write_text(out / HEAD_CARD, json.dumps(card, indent=2, default=str))
    return out


def record_operating_point(out_dir: str | Path, operating_point: dict[str, Any]) -> None:
    """Add the tuned ``operating_point`` (threshold, criterion, split) to a head bundle's card."""
    path = Path(out_dir) / HEAD_CARD
    card = json.loads(path.read_text())
    card["operating_point"] = operating_point
    atomic_write_text(path, json.dumps(card, indent=2, default=str))


def task_for_head(card: dict[str, Any]) -> HeadTask:
    """The task of a head bundle's card, at the bundle's tuned operating point when it has one
    (screws: scored with the matching radius the head was trained and tuned with)."""
    num_classes = card["head_kwargs"].get("num_classes") if card["task"] == "classify" else None
    task = get_task(card["task"], num_classes)
    if isinstance(task, DetectTask):
        task.max_dist = float(card.get("train_config", {}).get("match_px", task.max_dist))
    if op := card.get("operating_point"):
        task.apply_operating_point(op)
    return task


def load_head_bundle(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a head bundle written by :func:`save_head_bundle`; returns (head, card)."""
    from safetensors.torch import load_file

    p = Path(path)
    card_path, weights = p / HEAD_CARD, p / HEAD_WEIGHTS
    if not card_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{p} is not a head bundle (needs {HEAD_CARD} and {HEAD_WEIGHTS}); "
                                "pass a folder written by `xrayfm heads train`")
    card = json.loads(card_path.read_text())
    state = load_file(str(weights))
    try:
        kwargs = dict(card["head_kwargs"])
        if head_info(card["head"])[1] == "pooled":
            kwargs.setdefault("feature_norm", "layernorm")  # bundles from before feature_norm existed
        head = create_head(card["head"], card["embed_dim"], card["dense_channels"], card["dense_strides"], **kwargs)
    except KeyError as exc:
        raise ValueError(f"{card_path} lacks the key {exc}; re-train the head") from exc
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]  # torch lists the keys over several lines
        raise ValueError(f"{weights} does not fit the head its card describes ({detail}); it was saved by "
                         "another xrayfm version: re-train the head with `xrayfm heads train`") from exc
    return head.eval(), card
