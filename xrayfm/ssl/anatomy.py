"""Anatomy-aware hierarchical SSL (``method: anatomy``), after Taher, Gotway and Liang.

Implemented from the descriptions in arXiv 2309.15358 (Adam-v1) and 2404.15672 (Adam-v2 / Eden);
no code of the authors was read or used. Training cuts coarse-to-fine windows from each image
(:mod:`xrayfm.ssl.anatomy_views`) and adds two part-whole losses to DINO's:

* localizability: :class:`~xrayfm.ssl.dino.DinoLoss` between the teacher's global views of the
  window and the student's other views of it;
* composability: MSE between an MLP over the concatenated student part embeddings and the
  teacher's whole-window embedding (both L2-normalised, teacher without gradient);
* decomposability: MSE between the chunks of an MLP over the student's whole-window embedding
  and the teacher's part embeddings, each chunk L2-normalised on its own.

Embeddings are the backbones' pooled outputs (what downstream heads and the part-whole measure
use). "MSE" of two unit vectors is their squared L2 distance, ``2 - 2 cos``, averaged over images
(and parts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xrayfm.config import ConfigError
from xrayfm.models.backbones import Backbone
from xrayfm.ssl.anatomy_views import (
    AnatomyConfig,
    AnatomyTransform,
    collate_anatomy,
    crop,
    part_boxes,
    resize,
    staged_granularity,
    window_size,
)
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.dino import DinoHead, DinoMethod, update_momentum
from xrayfm.ssl.registry import Progress, register_method


def unit_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of the squared L2 distance between the L2-normalised rows of both."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return (pred - target).pow(2).sum(-1).mean()


def composability_loss(composed: Tensor, teacher_whole: Tensor) -> Tensor:
    """``composed`` (B, D) from the parts vs the teacher's whole-window embedding (B, D)."""
    return unit_mse(composed, teacher_whole.detach())


def decomposability_loss(decomposed: Tensor, teacher_parts: Tensor) -> Tensor:
    """``decomposed`` (B, P*D) from the whole vs the teacher's part embeddings (B, P, D).

    Each of the P chunks is normalised separately: normalising the whole concatenation (as the
    reference code does) leaves every chunk with norm 1/sqrt(P), so no chunk could ever equal
    its unit-norm target.
    """
    b, p, d = teacher_parts.shape
    return unit_mse(decomposed.view(b, p, d), teacher_parts.detach())


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def embed(backbone: nn.Module, x: Tensor, channels_last: bool) -> Tensor:
    """Pooled embeddings of a batch of views (channels-last for CNNs)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return backbone(x)


class AnatomyStudent(nn.Module):
    """Student: backbone + DINO head + compose / decompose MLPs, one forward (so DDP syncs all).

    Views of equal size (locals and parts at the default part size) share one backbone call.
    """

    def __init__(self, backbone: Backbone, head: DinoHead, n_parts: int, hidden: int,
                 channels_last: bool) -> None:
        super().__init__()
        d = backbone.embed_dim
        self.backbone, self.head, self.n_parts = backbone, head, n_parts
        self.compose = _mlp(n_parts * d, hidden, d)
        self.decompose = _mlp(d, hidden, n_parts * d)
        self.channels_last = channels_last

    def forward(self, glob: Tensor, local: Tensor, parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (head logits of globals then locals, composed (B, D), decomposed (B, P*D))."""
        b = glob.shape[0] // 2
        n_loc = local.shape[0] if local.numel() else 0
        f_glob = embed(self.backbone, glob, self.channels_last)
        if n_loc and local.shape[-2:] == parts.shape[-2:]:
            f_small = embed(self.backbone, torch.cat([local, parts]), self.channels_last)
            f_loc, f_parts = f_small[:n_loc], f_small[n_loc:]
        else:
            f_loc = embed(self.backbone, local, self.channels_last) if n_loc else f_glob[:0]
            f_parts = embed(self.backbone, parts, self.channels_last)
        logits = self.head(torch.cat([f_glob, f_loc]))
        parts_cat = f_parts.view(self.n_parts, b, -1).transpose(0, 1).flatten(1)  # (B, P*D), part-major
        return logits, self.compose(parts_cat), self.decompose(f_glob[:b])


class AnatomyMethod(DinoMethod):
    """DINO on coarse-to-fine windows plus composability and decomposability losses.

    Reuses DINO's backbones, head, loss with centre, teacher temperature, last-layer freezing,
    collapse warnings and export (the teacher backbone); only views, loss and EMA differ.
    """

    name = "anatomy"

    def __init__(self, cfg: PretrainConfig) -> None:
        a: AnatomyConfig = cfg.anatomy
        a.validate()
        if a.schedule == "staged" and cfg.epochs < len(a.granularities):
            raise ConfigError(f"anatomy.schedule staged needs epochs >= {len(a.granularities)} (one stage per "
                              f"granularity), got epochs {cfg.epochs}; raise epochs or use schedule random")
        super().__init__(cfg)
        self.anatomy = a
        dino_student = self.student
        self.student = AnatomyStudent(dino_student.backbone, dino_student.head, a.n_parts, a.mlp_hidden_dim,
                                      dino_student.channels_last)
        self.transform: AnatomyTransform | None = None

    def make_transform(self) -> AnatomyTransform:
        c = self.cfg
        self.transform = AnatomyTransform(self.anatomy, c.global_size, c.local_size, c.n_local, c.global_scale,
                                          c.local_scale, c.augment)
        return self.transform

    def set_epoch(self, epoch: int) -> None:
        if self.transform is not None:
            self.transform.granularity = staged_granularity(epoch, self.cfg.epochs, self.anatomy.granularities)

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_anatomy(items)

    def loss(self, student: nn.Module, batch: dict[str, Tensor],
             progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        a = self.anatomy
        glob, parts = batch["global"], batch["parts"]
        b = glob.shape[0] // 2
        with torch.no_grad():
            t_glob = embed(self.teacher.backbone, glob, self.teacher.channels_last)
            t_logits = self.teacher.head(t_glob)
            t_parts = embed(self.teacher.backbone, parts, self.teacher.channels_last)
            t_parts = t_parts.view(a.n_parts, b, -1).transpose(0, 1)
        logits, composed, decomposed = student(glob, batch["local"], parts)
        local_loss, stats = self.criterion(logits, t_logits, self.teacher_temp(progress))
        comp = composability_loss(composed, t_glob[:b])
        dec = decomposability_loss(decomposed, t_parts)
        loss = (a.localizability_weight * local_loss + a.composability_weight * comp
                + a.decomposability_weight * dec)
        stats.update(localizability=local_loss.detach(), composability=comp.detach(),
                     decomposability=dec.detach(), granularity=batch["granularity"].mean())
        return loss, stats

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        update_momentum(self.student.backbone, self.teacher.backbone, momentum)
        update_momentum(self.student.head, self.teacher.head, momentum)


register_method("anatomy")(AnatomyMethod)


@torch.no_grad()
def part_whole_similarity(backbone: nn.Module, images: Sequence[Tensor], granularity: int = 0,
                          grid: tuple[int, int] = (2, 2), size: int = 224,
                          part_size: int | None = None, centre: bool = False) -> Tensor:
    """Cosine similarity between each window's embedding and the mean of its parts' embeddings.

    For every ``(1, H, W)`` image, the ``2**g x 2**g`` non-overlapping windows of granularity
    ``g`` (tiling from the top-left corner) are resized to ``size`` and each window's parts to
    ``part_size`` (default ``size // 2``, the training default of local = global / 2). Returns
    one value per window, image-major.

    ``centre=True`` first subtracts the mean of all window and part embeddings of the call: raw
    cosines include the direction every embedding shares (ResNet features are non-negative, so
    even a random network scores close to 1), the centred ones only what is specific to a window.
    """
    part_size = part_size or size // 2
    wholes, parts = [], []
    for img in images:
        if img.ndim != 3 or img.shape[0] != 1:
            raise ValueError(f"part_whole_similarity expects (1, H, W) images, got {tuple(img.shape)}")
        h, w = img.shape[1:]
        wh, ww = window_size(h, w, granularity)
        for i in range(1 << granularity):
            for j in range(1 << granularity):
                box = (i * wh, j * ww, wh, ww)
                wholes.append(resize(crop(img.float(), box), size))
                parts += [resize(crop(img.float(), pb), part_size) for pb in part_boxes(box, grid)]
    if not wholes:
        raise ValueError("part_whole_similarity needs at least one image")
    was_training = backbone.training
    backbone.eval()
    n_parts = grid[0] * grid[1]
    whole_emb = torch.cat([backbone(torch.stack(wholes[k:k + 64])) for k in range(0, len(wholes), 64)])
    part_emb = torch.cat([backbone(torch.stack(parts[k:k + 64])) for k in range(0, len(parts), 64)])
    backbone.train(was_training)
    whole_emb, part_emb = whole_emb.float(), part_emb.float()
    if centre:
        mu = torch.cat([whole_emb, part_emb]).mean(0)
        whole_emb, part_emb = whole_emb - mu, part_emb - mu
    mean_parts = part_emb.view(len(wholes), n_parts, -1).mean(1)
    return F.cosine_similarity(whole_emb, mean_parts, dim=-1)
