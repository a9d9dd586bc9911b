"""DINO (self-distillation with no labels) as small pieces: head, loss with centre, EMA teacher.

Follows Caron et al. 2021: the student sees all crops, the teacher only the global ones; the
teacher's output is centred (EMA of its batch mean) and sharpened (low temperature); the loss
is the cross-entropy teacher -> student over every pair of different views.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from xrayfm.config import ConfigError
from xrayfm.models.backbones import Backbone, ResNetBackbone, ViTBackbone, create_backbone
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.multicrop import MultiCropTransform, collate_crops
from xrayfm.ssl.registry import Progress, SSLMethod, register_method
from xrayfm.ssl.schedules import linear_warmup


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose rows are unit-normalised directions times a gain ``g``.

    With ``learn_gain=False`` (DINO's ``norm_last_layer``) the gain is fixed at 1.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_gain: bool = False) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight_v, dim=1) * self.weight_g)


class DinoHead(nn.Module):
    """Projection head: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, batch_norm: bool = False) -> None:
        super().__init__()

        def hidden(d_in: int) -> list[nn.Module]:
            return [nn.Linear(d_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []), nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        # Prototype scores are cosines later divided by a temperature of ~0.04: bf16's 8-bit
        # mantissa would quantise them to ~0.1 logit steps, so this small layer runs in fp32.
        with torch.autocast(z.device.type, enabled=False):
            return self.last_layer(z.float())


class CropOutputs(NamedTuple):
    """What :class:`MultiCropNet` returns for its crops, in order."""

    logits: Tensor        # (N, out_dim) head outputs of every crop
    pooled: Tensor        # (N, embed_dim) pooled backbone features
    dense: Tensor | None  # (N_0, h, w, dense_out_dim) dense-head outputs per cell of the first group


class MultiCropNet(nn.Module):
    """Backbone + head over crops of several resolutions: one backbone call per resolution.

    With a ``dense_head`` the first crop group (the global views) also gives the dense head's
    output for every cell of the backbone's dense map ``dense_level``, from the same pass.
    """

    def __init__(self, backbone: Backbone, head: DinoHead, dense_head: DinoHead | None = None,
                 dense_level: int = -1) -> None:
        super().__init__()
        self.backbone, self.head, self.dense_head = backbone, head, dense_head
        self.dense_level = dense_level
        self.channels_last = isinstance(backbone, ResNetBackbone)

    def forward(self, crops: Sequence[Tensor]) -> CropOutputs:
        feats, dense = [], None
        for i, x in enumerate(crops):
            if not x.numel():
                continue
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if i == 0 and self.dense_head is not None:
                pooled, grid = self.backbone.forward_with_dense(x, self.dense_level)
                cells = grid.permute(0, 2, 3, 1)
                dense = self.dense_head(cells.reshape(-1, cells.shape[-1])).view(*cells.shape[:3], -1)
                feats.append(pooled)
            else:
                feats.append(self.backbone(x))
        pooled = torch.cat(feats)
        return CropOutputs(self.head(pooled), pooled, dense)


def _all_reduce(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_out: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Teacher targets with equal mass per prototype over the (global) batch (DINOv2's centring).

    Alternately normalises the prototypes' total mass to 1/K and each sample's to 1/B, starting
    from ``exp(teacher_out / temp)``; rows of the result sum to 1. Sums are all-reduced when
    torch.distributed is initialised, so B is the batch over all ranks.
    """
    logits = teacher_out.float() / temp
    top = logits.max().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)  # one shift on every rank keeps the global sums exact
    q = (logits - top).exp().T  # (K, B)
    n_samples = _all_reduce(torch.tensor([float(q.shape[1])], device=q.device))
    k = q.shape[0]
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * k
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).T


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2): ``-mean log`` distance of each
    L2-normalised row to its nearest other row in the batch; pushes features apart."""
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1)
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
        d = (z - z[nearest]).norm(dim=-1)
        return -(d + eps).log().mean()


class DinoLoss(nn.Module):
    """Cross-entropy between centred/sharpened teacher and student distributions over view pairs.

    ``centering="ema"`` (DINO) subtracts an EMA of the teacher's batch mean before sharpening;
    ``"sinkhorn"`` (DINOv2) replaces both by :func:`sinkhorn_knopp` targets. Works in one
    process; the centre's batch mean is all-reduced only when torch.distributed is initialised.
    ``forward`` returns the loss and detached statistics: teacher entropy (per sample and of the
    batch mean) and KL(teacher || student).
    """

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "ema") -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.n_global, self.student_temp, self.center_momentum = n_global, student_temp, center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor,
                teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(student_out.device.type, enabled=False):  # the loss is always fp32
            return self._forward(student_out.float(), teacher_out.float().detach(), teacher_temp)

    def _forward(self, student_out: Tensor, teacher_out: Tensor,
                 teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        batch = teacher_out.shape[0] // self.n_global
        n_crops = student_out.shape[0] // batch
        log_p = F.log_softmax(student_out / self.student_temp, dim=-1).view(n_crops, batch, -1)
        if self.centering == "sinkhorn":
            q = sinkhorn_knopp(teacher_out, teacher_temp).view(self.n_global, batch, -1)
            log_q = q.clamp_min(1e-12).log()
        else:
            log_q = F.log_softmax((teacher_out - self.center) / teacher_temp, dim=-1)
            log_q = log_q.view(self.n_global, batch, -1)
            q = log_q.exp()
        # ce[t, v] = mean over the batch of -sum_k q_t log p_v; the pairs t == v are excluded.
        ce = -torch.einsum("tbk,vbk->tv", q, log_p) / batch
        keep = torch.ones_like(ce, dtype=torch.bool)
        keep[:, : self.n_global].fill_diagonal_(False)
        loss = ce[keep].mean()
        with torch.no_grad():
            entropy = -(q * log_q).sum(-1).mean()
            mean_q = q.mean(dim=(0, 1))
            batch_entropy = -(mean_q * mean_q.clamp_min(1e-12).log()).sum()
            stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
                     "kl": loss.detach() - entropy}
        if self.centering == "ema":
            update_center(self.center, teacher_out, self.center_momentum)
        return loss, stats


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> None:
    """``center = momentum * center + (1 - momentum) * mean`` of the rows of ``teacher_out``
    (all-reduced over ranks when torch.distributed is initialised)."""
    total = _all_reduce(teacher_out.sum(dim=0, keepdim=True))
    count = teacher_out.shape[0]
    if dist.is_available() and dist.is_initialized():
        count *= dist.get_world_size()
    center.mul_(momentum).add_(total / count, alpha=1.0 - momentum)


def cell_positions(coords: Tensor, grid: tuple[int, int],
                   min_cover: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """Where the cells of an ``(h, w)`` feature map of each view lie in its source image.

    ``coords`` (N, 3, S, S) are the views' coordinate maps (:func:`~xrayfm.ssl.augment.source_coordinates`).
    Returns each cell's source position ``(N, h * w, 2)``; whether the view covers the cell
    (``(N, h * w)``, at least ``min_cover`` of its pixels inside the image); and the cell axes
    ``(N, 2, 2)``, the source displacement of one cell step along the view's columns (``[:, :, 0]``)
    and rows (``[:, :, 1]``) — crops, flips and rotations are affine, so one pair serves the view.
    """
    coords = coords.float()
    pooled = F.adaptive_avg_pool2d(coords, grid)
    cover = pooled[:, 2]
    xy = pooled[:, :2] / cover.clamp_min(1e-6).unsqueeze(1)
    size, c = coords.shape[-1], coords.shape[-1] // 2  # the centre pixel is always inside the image
    across = (coords[:, :2, c, c + 1] - coords[:, :2, c, c]) * size / grid[1]
    down = (coords[:, :2, c + 1, c] - coords[:, :2, c, c]) * size / grid[0]
    return xy.flatten(2).transpose(1, 2), (cover >= min_cover).flatten(1), torch.stack([across, down], dim=2)


def match_cells(xy_s: Tensor, ok_s: Tensor, xy_t: Tensor, ok_t: Tensor,
                axes_t: Tensor) -> tuple[Tensor, Tensor]:
    """For each cell of view s the nearest covered cell of view t at the same image position.

    Returns the index ``(N, n_s)`` and whether it is a match ``(N, n_s)``: cell s covered and its
    centre inside the footprint of that t cell (within half a cell step along both of t's axes).
    """
    dist = torch.cdist(xy_s, xy_t).masked_fill(~ok_t.unsqueeze(1), float("inf"))
    index = dist.argmin(dim=-1)
    offset = xy_s - xy_t.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
    in_cells = torch.linalg.solve(axes_t.unsqueeze(1), offset.unsqueeze(-1)).squeeze(-1)
    return index, ok_s & ok_t.gather(1, index) & (in_cells.abs() <= 0.5 + 1e-4).all(dim=-1)


class DenseDinoLoss(nn.Module):
    """Patch-level DINO between the two global views (the dense term of iBOT / DINOv2, paired by
    position instead of masking, so it works for ResNets too).

    Each student cell of one global view learns the centred, sharpened teacher distribution of
    the cell at the same image position in the other view; cells without a partner (outside the
    other crop) are left out. Own centre, an EMA of the mean teacher output over all cells.
    ``forward`` returns the loss and detached statistics: the fraction of cells matched and the
    teacher's mean per-cell entropy.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: Tensor, teacher_out: Tensor, coords: Tensor,
                teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """``student_out``, ``teacher_out`` (2B, h, w, K): view 0 of every image, then view 1;
        ``coords`` (2B, 3, S, S) in the same order."""
        with torch.autocast(student_out.device.type, enabled=False):
            return self._forward(student_out.float(), teacher_out.float().detach(), coords, teacher_temp)

    def _forward(self, student_out: Tensor, teacher_out: Tensor, coords: Tensor,
                 teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        n, h, w, k = student_out.shape
        batch = n // 2
        xy, ok, axes = cell_positions(coords, (h, w))
        log_p = F.log_softmax(student_out.reshape(n, h * w, k) / self.student_temp, dim=-1)
        teacher = teacher_out.reshape(n, h * w, k)
        log_q = F.log_softmax((teacher - self.center) / teacher_temp, dim=-1)
        q = log_q.exp()
        total, count = student_out.new_zeros(()), student_out.new_zeros(())
        for s_view in (0, 1):
            s, t = slice(s_view * batch, (s_view + 1) * batch), slice((1 - s_view) * batch, (2 - s_view) * batch)
            index, matched = match_cells(xy[s], ok[s], xy[t], ok[t], axes[t])
            target = q[t].gather(1, index.unsqueeze(-1).expand(-1, -1, k))
            ce = -(target * log_p[s]).sum(-1)
            total = total + (ce * matched).sum()
            count = count + matched.sum()
        loss = total / count.clamp_min(1.0)
        with torch.no_grad():
            stats = {"dense_loss": loss.detach(), "dense_matched": count / (n * h * w),
                     "dense_teacher_entropy": -(q * log_q).sum(-1).mean()}
        update_center(self.center, teacher.reshape(-1, k), self.center_momentum)
        return loss, stats


@torch.no_grad()
def update_momentum(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter-wise, in one fused call."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student must have the same parameters")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


class DinoMethod(SSLMethod):
    """DINO: multi-crop views, student/teacher ``MultiCropNet``, :class:`DinoLoss`, EMA teacher."""

    name = "dino"

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        student_bb = create_backbone(cfg.arch, img_size=cfg.global_size, drop_path_rate=cfg.drop_path_rate,
                                     pretrained_path=cfg.init, input_norm=cfg.input_norm)
        teacher_bb = create_backbone(cfg.arch, img_size=cfg.global_size, input_norm=cfg.input_norm)
        teacher_bb.load_state_dict(student_bb.state_dict())
        if cfg.freeze_patch_embed:
            if not isinstance(student_bb, ViTBackbone):
                raise ConfigError(f"freeze_patch_embed applies to ViT backbones, not {cfg.arch}; set it to false")
            student_bb.model.patch_embed.requires_grad_(False)

        def head(in_dim: int, out_dim: int, hidden_dim: int) -> DinoHead:
            return DinoHead(in_dim, out_dim, hidden_dim, cfg.bottleneck_dim, cfg.norm_last_layer, cfg.head_bn)

        dense_head = None
        self.dense_criterion: DenseDinoLoss | None = None
        if cfg.dense_weight > 0:
            levels = len(student_bb.dense_channels)
            if not -levels <= cfg.dense_level < levels:
                raise ConfigError(f"dense_level {cfg.dense_level} is out of range for {cfg.arch}, which has "
                                  f"{levels} dense maps; use -{levels}..{levels - 1} (-1 = the last)")
            dense_head = head(student_bb.dense_channels[cfg.dense_level], cfg.dense_out_dim, cfg.dense_hidden_dim)
            self.dense_criterion = DenseDinoLoss(cfg.dense_out_dim, cfg.student_temp, cfg.center_momentum)
        self.student = MultiCropNet(student_bb, head(student_bb.embed_dim, cfg.out_dim, cfg.hidden_dim),
                                    dense_head, cfg.dense_level)
        self.teacher = MultiCropNet(teacher_bb, copy.deepcopy(self.student.head), copy.deepcopy(dense_head),
                                    cfg.dense_level)
        self.teacher.requires_grad_(False)
        if isinstance(student_bb, ResNetBackbone):
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        self.criterion = DinoLoss(cfg.out_dim, 2, cfg.student_temp, cfg.center_momentum, cfg.centering)

    def make_transform(self) -> MultiCropTransform:
        c = self.cfg
        return MultiCropTransform(c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale,
                                  c.augment, coords=self.dense_criterion is not None)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_crops(items)

    def teacher_temp(self, progress: Progress) -> float:
        warm = self.cfg.warmup_teacher_temp_epochs * progress.steps_per_epoch
        return linear_warmup(progress.step, round(warm), self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def loss(self, student: nn.Module, batch: dict[str, Tensor],
             progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        temp = self.teacher_temp(progress)
        with torch.no_grad():
            teacher = self.teacher([batch["global"]])
        out = student([batch["global"], batch["local"]])
        loss, stats = self.criterion(out.logits, teacher.logits, temp)
        if self.cfg.koleo_weight > 0:
            n = batch["global"].shape[0] // 2
            koleo = sum(koleo_loss(out.pooled[i * n:(i + 1) * n]) for i in range(2)) / 2
            stats["koleo"] = koleo.detach()
            loss = loss + self.cfg.koleo_weight * koleo
        if self.dense_criterion is not None:
            dense, dense_stats = self.dense_criterion(out.dense, teacher.dense, batch["global_coords"], temp)
            stats.update(dense_stats)
            loss = loss + self.cfg.dense_weight * dense
        return loss, stats

    def after_backward(self, progress: Progress) -> None:
        if progress.epoch_float < self.cfg.freeze_last_layer_epochs:
            heads = [self.student.head] + ([self.student.dense_head] if self.dense_criterion is not None else [])
            for p in (p for h in heads for p in h.last_layer.parameters()):
                p.grad = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.student, self.teacher, momentum)

    def collapse_warning(self, stats: dict[str, float]) -> str | None:
        ln_k = math.log(self.cfg.out_dim)
        if stats["teacher_entropy"] > 0.98 * ln_k:
            return (f"collapse: teacher entropy {stats['teacher_entropy']:.2f} ~ ln(out_dim) = {ln_k:.2f} "
                    "(uniform outputs); lower teacher_temp or out_dim, or raise center_momentum")
        if stats["teacher_batch_entropy"] < 0.05 * ln_k:
            return (f"collapse: entropy of the mean teacher output {stats['teacher_batch_entropy']:.3f} ~ 0 "
                    "(one dimension dominates); raise teacher_temp slowly or lower the lr")
        return None

    def trained_backbone(self) -> Backbone:
        return self.teacher.backbone


register_method("dino")(DinoMethod)
