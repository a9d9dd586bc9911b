"""Small task heads on a (frozen) backbone, and their registry.

A head reads either the pooled embedding ``(B, D)`` (``input_kind = "pooled"``) or the backbone's
multi-scale dense maps ``[(B, C_i, H/s_i, W/s_i)]`` (``input_kind = "dense"``) and returns logits:

- ``linear`` / ``mlp`` (classification): ``(B, num_classes)``.
- ``seg_decoder`` (segmentation): ``(B, num_classes, H, W)`` at the input size.
- ``screw_keypoints`` (screw detection): ``(B, 12, H/s, W/s)`` maps (``out_stride`` s, 4 by default), channels as in
  :data:`DETECTION_CHANNELS` (11 in bundles from before ``superimposed``); :mod:`xrayfm.tasks.detect` encodes
  targets and decodes screws.

Both dense heads share :class:`ProgressiveDecoder`: every backbone map is projected to a common
width by a 1×1 conv and group-normalised, maps of equal stride are summed, and the coarsest map is upsampled ×2 step by
step, adding the lateral map of each stride it passes (FPN-style for ResNet's 4 stages at strides
4–32; for a ViT, whose blocks all sit at the patch stride, this is a concat of blocks followed by
progressive upsampling). With ``image_skip`` the normalised input image follows the maps and joins
the decoder at its output stride. A new head is one :func:`register_head` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xrayfm.models.backbones import POOLINGS

DETECTION_CHANNELS = ("heat_head", "heat_tip", "head_off_x", "head_off_y", "tip_off_x", "tip_off_y",
                      "head_to_tip_x", "head_to_tip_y", "tip_to_head_x", "tip_to_head_y", "box_pad",
                      "heat_superimposed")
N_HEATMAPS = 2      # the first channels: screw heads and tips
N_REGRESSIONS = 9   # then offsets, vectors and the box margin
SUPERIMPOSED_CHANNEL = N_HEATMAPS + N_REGRESSIONS  # last: the superimposed-screw heatmap (newer heads)
# (x, y) channel pairs that rotate and mirror with the image: offsets and head<->tip vectors
VECTOR_CHANNELS = tuple((i, i + 1) for i, n in enumerate(DETECTION_CHANNELS) if n.endswith("_x"))

_HEADS: dict[str, tuple[str, str, Callable[..., nn.Module]]] = {}


def register_head(name: str, task: str, input_kind: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a head factory ``f(embed_dim, dense_channels, dense_strides, **kw)``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is registered twice")
        _HEADS[name] = (task, input_kind, factory)
        return factory

    return deco


def list_heads(task: str | None = None) -> list[str]:
    """Names of registered heads, optionally only those for ``task``."""
    return sorted(n for n, (t, _, _) in _HEADS.items() if task is None or t == task)


def head_info(name: str) -> tuple[str, str]:
    """``(task, input_kind)`` of a registered head."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {list_heads()}")
    task, kind, _ = _HEADS[name]
    return task, kind


def create_head(name: str, embed_dim: int, dense_channels: Sequence[int], dense_strides: Sequence[int],
                **kwargs: Any) -> nn.Module:
    """Build a registered head for a backbone with the given feature geometry."""
    head_info(name)
    task, kind, factory = _HEADS[name]
    pool = kwargs.get("pool", "final")
    if kind == "pooled":
        if pool not in POOLINGS:
            raise ValueError(f"head {name}: pool must be one of {', '.join(POOLINGS)}, got {pool!r}")
        embed_dim = embed_dim if pool == "final" else sum(dense_channels)
    head = factory(embed_dim=embed_dim, dense_channels=list(dense_channels),
                   dense_strides=list(dense_strides), **kwargs)
    head.head_name, head.task, head.input_kind = name, task, kind  # type: ignore[assignment]
    if kind == "pooled":
        head.pool = pool  # which pooled embedding of the backbone the head reads
    return head


def head_pool(head: nn.Module) -> str:
    """The pooled embedding a head reads (``Backbone.forward_pooled``); "final" for dense heads."""
    return str(getattr(head, "pool", "final"))


def head_reads_image(head: nn.Module) -> bool:
    """Whether a dense head takes the normalised input image after the backbone's maps (``image_skip``)."""
    return bool(getattr(head, "image_skip", False))


POOLED_NORMS = ("standardize", "layernorm")


class FeatureStandardize(nn.Module):
    """Per-embedding LayerNorm (no parameters), then per-feature standardisation with training-set
    statistics held as buffers (identity standardisation until :meth:`fit` sees the training
    features).

    Frozen self-supervised features put most of their variance in a few directions, so the
    LayerNorm alone leaves the other features badly scaled; scaling each feature by its spread over
    the training set (what scikit-learn's ``StandardScaler`` does before a linear probe) conditions
    the head better. ``benchmarks/classify_head_norm.py`` (docs/heads-experiments.md): at 100 % of the labels
    +5.6 points of region accuracy for a DINO ViT-tiny and +1.9 for a DINO ResNet-18 over the
    LayerNorm alone; at 1 % and 10 % within a seed's noise of it or better.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @staticmethod
    def _layer_norm(x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), x.shape[-1:])

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set mean and std from ``x`` ``(N, dim)``; a feature's std is floored at 1 % of the median
        std so that a feature constant over a few labelled images does not blow up at test time
        (with no spread at all, one image, only the mean is used)."""
        if x.ndim != 2 or x.shape[1] != self.mean.numel() or x.shape[0] == 0:
            raise ValueError(f"feature statistics need (N >= 1, {self.mean.numel()}) features, got {tuple(x.shape)}")
        x = self._layer_norm(x)
        std = x.std(0, unbiased=False)
        floor = float(std.median()) * 1e-2
        self.mean.copy_(x.mean(0))
        self.std.copy_(std.clamp_min(floor) if floor > 0 else torch.ones_like(std))

    def forward(self, x: Tensor) -> Tensor:
        return (self._layer_norm(x) - self.mean) / self.std


def _pooled_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    if kind == "standardize":
        return FeatureStandardize(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    raise ValueError(f"feature_norm must be one of {', '.join(POOLED_NORMS)}, got {kind!r}")


def input_standardizer(head: nn.Module) -> FeatureStandardize | None:
    """The head's :class:`FeatureStandardize` input, to :meth:`~FeatureStandardize.fit` on the
    training features before training; ``None`` for heads without one."""
    return next((m for m in head.modules() if isinstance(m, FeatureStandardize)), None)


@torch.no_grad()
def switch_off_classes(head: nn.Module, classes: Sequence[int]) -> None:
    """Give ``classes`` probability ~0 in a pooled classification head: the weights of their logits
    in the head's last linear layer become 0 and their bias -1e4."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(head).__name__} has no linear layer to switch classes off in")
    last = linears[-1]
    idx = torch.as_tensor(list(classes), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= last.out_features):
        raise ValueError(f"classes {list(classes)} outside the head's {last.out_features} outputs")
    last.weight[idx] = 0.0
    last.bias[idx] = -1e4


def _small_init(layer: nn.Linear) -> nn.Linear:
    """Classifier weights N(0, 0.01), bias 0 (DINO's linear evaluation): the logit of a class with
    no training example stays near its (falling) bias instead of a random projection of the
    input, so it is not predicted on test images unlike the training set."""
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)
    return layer


class LinearHead(nn.Module):
    """Linear probe on the pooled embedding, behind a parameter-free input normalisation."""

    def __init__(self, embed_dim: int, num_classes: int, feature_norm: str = "standardize") -> None:
        super().__init__()
        self.norm = _pooled_norm(feature_norm, embed_dim, affine=False)
        self.fc = _small_init(nn.Linear(embed_dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class MLPHead(nn.Module):
    """Two-layer MLP on the pooled embedding (``layernorm``: a learnable LayerNorm first)."""

    def __init__(self, embed_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.1,
                 feature_norm: str = "standardize") -> None:
        super().__init__()
        self.net = nn.Sequential(
            _pooled_norm(feature_norm, embed_dim, affine=True), nn.Linear(embed_dim, hidden), nn.GELU(),
            nn.Dropout(dropout), _small_init(nn.Linear(hidden, num_classes)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class ProgressiveDecoder(nn.Module):
    """Multi-scale maps -> one map of :attr:`out_channels` channels at ``out_stride``.

    Down to stride 4 every step has ``width`` channels; each ×2 step below stride 4 halves them
    (at least 16), which keeps the finer maps' convolutions affordable (a stride-1 head with the
    image still trains ~10x slower than a stride-4 one on a CPU thread, docs/heads-experiments.md). With
    ``image_skip`` the (normalised) input image is the last element of ``feats``: a small conv
    stem reads it at full resolution and joins the map at ``out_stride``, before the last block,
    so edges the backbone's coarse maps lose (thin metal) reach the output.
    """

    def __init__(self, dense_channels: Sequence[int], dense_strides: Sequence[int], width: int = 64,
                 out_stride: int = 4, image_skip: bool = False) -> None:
        super().__init__()
        if len(dense_channels) != len(dense_strides) or not dense_channels:
            raise ValueError("backbone must report one stride per dense map (dense_channels/dense_strides)")
        if out_stride > min(dense_strides) and out_stride not in dense_strides:
            raise ValueError(f"out_stride {out_stride} must be a power-of-two step below stride {min(dense_strides)}")
        self.strides = list(dense_strides)
        self.out_stride = out_stride
        self.image_skip = image_skip
        # Normalising each projected map puts frozen features of any scale on an equal footing.
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 1), nn.GroupNorm(8, width))
                                     for c in dense_channels)
        top = max(dense_strides)
        steps = []
        s = top
        while s > out_stride:
            steps.append(s // 2)
            s //= 2
        self.step_strides = steps
        chans = [width] + [self._channels(width, s) for s in steps]
        self.out_channels = chans[-1]
        self.top_block = _conv_block(width, width)
        self.blocks = nn.ModuleList(_conv_block(cin, cout) for cin, cout in pairwise(chans))
        if image_skip:
            stem_ch = 16
            self.image_stem = nn.Sequential(
                _conv_block(1, stem_ch), _conv_block(stem_ch, stem_ch),
                nn.AvgPool2d(out_stride) if out_stride > 1 else nn.Identity(),
                nn.Conv2d(stem_ch, chans[-2] if steps else width, 1))

    @staticmethod
    def _channels(width: int, stride: int) -> int:
        return width if stride >= 4 else max(16, width * stride // 4)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        n = len(self.lateral) + int(self.image_skip)
        if len(feats) != n:
            extra = " plus the input image (image_skip)" if self.image_skip else ""
            raise ValueError(f"decoder built for {len(self.lateral)} dense maps{extra}, got {len(feats)} inputs")
        by_stride: dict[int, Tensor] = {}
        for s, f, proj in zip(self.strides, feats, self.lateral):
            # fp32 even under autocast: frozen features rounded to bf16 (8-bit mantissa) cost the
            # metal head a point of Dice; these 1x1 projections are a small part of the work
            with torch.autocast(f.device.type, enabled=False):
                y = proj(f.float())
            by_stride[s] = by_stride[s] + y if s in by_stride else y
        skip = self.image_stem(feats[-1].float()) if self.image_skip else None
        x = by_stride[max(self.strides)]
        if skip is not None and not self.step_strides:
            x = x + _fit(skip, x)
        x = self.top_block(x)
        for s, block in zip(self.step_strides, self.blocks):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if s in by_stride:
                x = _fit(x, by_stride[s]) + by_stride[s]
            if skip is not None and s == self.out_stride:
                x = x + _fit(skip, x)
            x = block(x)
        return x


def _fit(y: Tensor, like: Tensor) -> Tensor:
    """``y`` resized to ``like``'s grid when the input size is not a multiple of the stride."""
    return y if y.shape[-2:] == like.shape[-2:] else F.interpolate(y, size=like.shape[-2:], mode="bilinear",
                                                                   align_corners=False)


class SegmentationHead(nn.Module):
    """Progressive decoder -> per-pixel logits at ``out_stride``, bilinearly upsampled to the input size.

    ``out_stride`` 2 or 1 adds learned upsampling steps below the finest backbone map: thin metal
    needs them (benchmarks/seg_ceiling.py: a perfect stride-4 mask at 128 px reaches Dice 0.76,
    at stride 2 0.90), and ``image_skip`` gives those steps the input's own edges."""

    def __init__(self, dense_channels: Sequence[int], dense_strides: Sequence[int], num_classes: int = 1,
                 width: int = 64, out_stride: int = 4, image_skip: bool = False) -> None:
        super().__init__()
        self.decoder = ProgressiveDecoder(dense_channels, dense_strides, width,
                                          out_stride=min(out_stride, min(dense_strides)), image_skip=image_skip)
        self.image_skip = image_skip
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        x = self.decoder(feats)
        # logits and their upsampling in fp32 under autocast too (one channel: cheap), so the
        # loss and the probability maps see no bf16 rounding
        with torch.autocast(x.device.type, enabled=False):
            y = self.classifier(x.float())
            if size is None:
                s = self.decoder.out_stride
                size = (y.shape[-2] * s, y.shape[-1] * s)
            return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class KeypointHead(nn.Module):
    """Screw keypoint head at ``out_stride`` (4; 2 separates screws whose ends lie a few pixels
    apart): heatmap logits for screw heads and tips, sub-cell offsets, the vector from each head
    to its tip and back, and a box margin (regressions in stride units). With ``superimposed`` a
    last heatmap marks the heads of screws that lie on another one (a lateral view's left and
    right pedicle screws), which one head-tip peak pair cannot tell apart."""

    vector_channels = VECTOR_CHANNELS  # what test-time augmentation turns with the map (tasks/tta.py)

    def __init__(self, dense_channels: Sequence[int], dense_strides: Sequence[int], width: int = 64,
                 heat_prior: float = 0.01, out_stride: int = 4, image_skip: bool = False,
                 superimposed: bool = False) -> None:
        super().__init__()
        if min(dense_strides) < out_stride:
            raise ValueError(f"detector needs backbone maps at stride >= {out_stride}, got {min(dense_strides)}")
        self.stride = out_stride
        self.image_skip = image_skip
        self.superimposed = superimposed
        self.decoder = ProgressiveDecoder(dense_channels, dense_strides, width, out_stride=out_stride,
                                          image_skip=image_skip)
        c = self.decoder.out_channels
        n_heat = N_HEATMAPS + int(superimposed)
        self.heat = nn.Sequential(_conv_block(c, c), nn.Conv2d(c, n_heat, 1))
        self.regress = nn.Sequential(_conv_block(c, c), nn.Conv2d(c, N_REGRESSIONS, 1))
        # Start with a low keypoint probability everywhere so the focal loss is stable (CenterNet).
        nn.init.constant_(self.heat[-1].bias, float(torch.logit(torch.tensor(heat_prior))))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.decoder(feats)
        heat = self.heat(x)
        return torch.cat([heat[:, :N_HEATMAPS], self.regress(x), heat[:, N_HEATMAPS:]], dim=1)


@register_head("linear", task="classify", input_kind="pooled")
def _linear(embed_dim: int, num_classes: int, feature_norm: str = "standardize", **_: Any) -> nn.Module:
    return LinearHead(embed_dim, num_classes, feature_norm)


@register_head("mlp", task="classify", input_kind="pooled")
def _mlp(embed_dim: int, num_classes: int, hidden: int = 512, feature_norm: str = "standardize",
         **_: Any) -> nn.Module:
    return MLPHead(embed_dim, num_classes, hidden, feature_norm=feature_norm)


@register_head("seg_decoder", task="segment", input_kind="dense")
def _seg(dense_channels: list[int], dense_strides: list[int], num_classes: int = 1, width: int = 64,
         out_stride: int = 4, image_skip: bool = False, **_: Any) -> nn.Module:
    return SegmentationHead(dense_channels, dense_strides, num_classes, width, out_stride, image_skip)


@register_head("screw_keypoints", task="detect", input_kind="dense")
def _screw_keypoints(dense_channels: list[int], dense_strides: list[int], width: int = 64,
                     out_stride: int = 4, image_skip: bool = False, superimposed: bool = False,
                     **_: Any) -> nn.Module:
    return KeypointHead(dense_channels, dense_strides, width, out_stride=out_stride, image_skip=image_skip,
                        superimposed=superimposed)
