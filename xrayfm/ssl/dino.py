"""DINO (self-distillation with no labels) as small pieces: head, loss with centre, EMA teacher.

Follows Caron et al. 2021: the student sees all crops, the teacher only the global ones; the
teacher's output is centred (EMA of its batch mean) and sharpened (low temperature); the loss
is the cross-entropy teacher -> student over every pair of different views.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

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


class MultiCropNet(nn.Module):
    """Backbone + head over crops of several resolutions: one backbone call per resolution."""

    def __init__(self, backbone: Backbone, head: DinoHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.channels_last = isinstance(backbone, ResNetBackbone)

    def forward(self, crops: Sequence[Tensor], return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Head outputs of all crops in order; with ``return_features`` also the pooled backbone features."""
        feats = []
        for x in crops:
            if x.numel():
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats.append(self.backbone(x))
        pooled = torch.cat(feats)
        out = self.head(pooled)
        return (out, pooled) if return_features else out


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
            self.update_center(teacher_out)
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        total = _all_reduce(teacher_out.sum(dim=0, keepdim=True))
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1.0 - self.center_momentum)


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

        def head() -> DinoHead:
            return DinoHead(student_bb.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                            cfg.norm_last_layer, cfg.head_bn)

        self.student = MultiCropNet(student_bb, head())
        self.teacher = MultiCropNet(teacher_bb, copy.deepcopy(self.student.head))
        self.teacher.requires_grad_(False)
        if isinstance(student_bb, ResNetBackbone):
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        self.criterion = DinoLoss(cfg.out_dim, 2, cfg.student_temp, cfg.center_momentum, cfg.centering)

    def make_transform(self) -> MultiCropTransform:
        c = self.cfg
        return MultiCropTransform(c.global_size, c.local_size, c.n_local, c.global_scale, c.local_scale,
                                  c.augment)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_crops(items)

    def teacher_temp(self, progress: Progress) -> float:
        warm = self.cfg.warmup_teacher_temp_epochs * progress.steps_per_epoch
        return linear_warmup(progress.step, round(warm), self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def loss(self, student: nn.Module, batch: dict[str, Tensor],
             progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_out = self.teacher([batch["global"]])
        if self.cfg.koleo_weight <= 0:
            student_out = student([batch["global"], batch["local"]])
            return self.criterion(student_out, teacher_out, self.teacher_temp(progress))
        student_out, pooled = student([batch["global"], batch["local"]], return_features=True)
        loss, stats = self.criterion(student_out, teacher_out, self.teacher_temp(progress))
        n = batch["global"].shape[0] // 2
        koleo = sum(koleo_loss(pooled[i * n:(i + 1) * n]) for i in range(2)) / 2
        stats["koleo"] = koleo.detach()
        return loss + self.cfg.koleo_weight * koleo, stats

    def after_backward(self, progress: Progress) -> None:
        if progress.epoch_float < self.cfg.freeze_last_layer_epochs:
            for p in self.student.head.last_layer.parameters():
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
