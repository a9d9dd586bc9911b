"""Backbone registry over timm: single-channel X-ray encoders with pooled and dense outputs.

Every backbone takes ``(B, 1, H, W)`` float images in ``[0, 1]`` (``xrayfm.conventions``) and
normalises them itself, so callers never normalise: ``input_norm="fixed"`` with ``PIXEL_MEAN`` /
``PIXEL_STD``, ``"equalize"`` by histogram-equalising each image (:func:`equalize`), which makes the
features blind to brightness, contrast, window/level and gamma and leaves only image structure.

* ViT: dynamic image size (positional embedding interpolated), so 224-px global and 96-px local
  crops go through the same weights. ``forward`` = CLS token after the final norm; dense = patch
  tokens of four evenly spaced blocks (final norm applied), reshaped to grids of stride = patch.
* ResNet: ``forward`` = global average pool of the last stage; dense = the four stages
  (strides 4, 8, 16, 32).

A new backbone is one :func:`register_backbone` line at the bottom of this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, resample_abs_pos_embed
from torch import Tensor, nn

from xrayfm.conventions import PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: our name, the timm model name, its family and extra timm arguments."""

    name: str
    timm_name: str
    family: str  # "vit" or "resnet"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneSpec] = {}
INPUT_NORMS = ("fixed", "equalize")
# Pooled embeddings a head can read: the backbone's own (``forward``), or the global average of
# every dense level concatenated (sum(dense_channels) features).
POOLINGS = ("final", "multilevel")

# Prefixes found in checkpoints of DINO (module./backbone./teacher./student.), DDP, Lightning
# (model./encoder.) and our own trainer; stripped repeatedly from the front of every key.
_KEY_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "model.", "encoder.", "_orig_mod.")
# Nested containers that checkpoints wrap the state dict in, in order of preference (the DINO
# teacher is the model used for evaluation).
_CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "backbone")


def register_backbone(name: str, timm_name: str, family: str, **timm_kwargs: Any) -> None:
    """Register backbone ``name`` built from timm model ``timm_name`` (family "vit" or "resnet");
    ``timm_kwargs`` (e.g. ``patch_size=8``) go to ``timm.create_model``."""
    if family not in ("vit", "resnet"):
        raise ValueError(f"backbone {name}: family must be 'vit' or 'resnet', got {family!r}")
    _REGISTRY[name] = BackboneSpec(name, timm_name, family, dict(timm_kwargs))


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of backbone ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}")
    return _REGISTRY[name]


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_REGISTRY)


class AutocastAttention(Attention):
    """timm self-attention whose softmax(QK^T)V runs in fp32 under CPU autocast.

    PyTorch's CPU flash attention is about 3x slower in bf16 than in fp32 (forward + backward,
    ViT-tiny shapes, measured here), while the qkv/proj matmuls gain from bf16 (AMX); so under
    CPU autocast only the attention core stays fp32. Elsewhere it is plain attention.
    """

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        drop = self.attn_drop.p if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                     dropout_p=drop, is_causal=is_causal).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop,
                                                 is_causal=is_causal)
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))))


def equalize(x: Tensor, bins: int = 4096) -> Tensor:
    """Histogram-equalise each image and channel of ``x`` (values in [0, 1]): a pixel becomes the
    fraction of its image's pixels below it, ties counted half (so equal values stay equal and a
    constant image maps to 0), rescaled to mean 0 and variance 1 (less where values tie). Any
    strictly increasing intensity map of the input leaves the output unchanged, up to the ``bins``
    quantisation."""
    b, c, h, w = x.shape
    q = (x.detach().float().clamp(0, 1) * (bins - 1)).round().long().reshape(b * c, h * w)
    offset = torch.arange(b * c, device=x.device).unsqueeze(1) * bins
    hist = torch.bincount((q + offset).reshape(-1), minlength=b * c * bins).reshape(b * c, bins).float()
    below = hist.cumsum(1) - 0.5 * hist
    u = below.gather(1, q) / (h * w)
    return ((u - 0.5) * math.sqrt(12.0)).reshape(b, c, h, w)


def pool_levels(maps: list[Tensor]) -> Tensor:
    """The global average of each dense map ``(B, C_i, h, w)``, concatenated: ``(B, sum C_i)``."""
    return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)


class Backbone(nn.Module):
    """Single-channel encoder: ``forward`` gives ``(B, embed_dim)``, ``forward_dense`` a feature pyramid."""

    arch: str
    embed_dim: int
    patch_size: int | None
    dense_channels: list[int]
    dense_strides: list[int]
    dense_indices: list[int]         # the timm block / stage behind each dense map
    # what pooled heads read unless told otherwise (docs/heads-experiments.md "Which pooled feature")
    default_pool: str = "final"

    def __init__(self, arch: str, model: nn.Module, input_norm: str = "fixed") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"{arch}: input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        self.arch = arch
        self.model = model
        self.input_norm = input_norm
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"{self.arch}: expected input of shape (B, 1, H, W), got {tuple(x.shape)}")
        if self.input_norm == "equalize":
            return equalize(x).to(x.dtype)
        return (x - self.pixel_mean) / self.pixel_std

    def forward_dense(self, x: Tensor) -> list[Tensor]:
        """Multi-scale feature maps ``(B, C_i, H / s_i, W / s_i)``; defined by each family."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward_dense")

    def forward_with_dense(self, x: Tensor, level: int = -1) -> tuple[Tensor, Tensor]:
        """``(forward(x), forward_dense(x)[level])`` from one pass; defined by each family."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward_with_dense")

    def forward_pooled(self, x: Tensor, pool: str = "final") -> Tensor:
        """The pooled embedding ``pool`` (one of :data:`POOLINGS`) of ``x``."""
        if pool == "final":
            return self(x)
        if pool == "multilevel":
            return pool_levels(self.forward_dense(x))
        raise ValueError(f"{self.arch}: pool must be one of {', '.join(POOLINGS)}, got {pool!r}")

    def resolve_pool(self, pool: str) -> str:
        """``pool`` with "auto" replaced by this family's :attr:`default_pool`."""
        return self.default_pool if pool == "auto" else pool


class ViTBackbone(Backbone):
    """timm VisionTransformer with dynamic image size; CLS token pooled, patch grids dense."""

    def __init__(self, arch: str, model: nn.Module, input_norm: str = "fixed", n_dense: int = 4) -> None:
        super().__init__(arch, model, input_norm)
        self.embed_dim = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        depth = len(model.blocks)
        self.dense_indices = [round((i + 1) * depth / n_dense) - 1 for i in range(n_dense)]
        self.dense_channels = [self.embed_dim] * n_dense
        self.dense_strides = [self.patch_size] * n_dense

    def _check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"{self.arch}: image size {h}x{w} must be divisible by the patch size {self.patch_size}; "
                "resize or crop the input"
            )

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalise(x)
        self._check_size(x)
        return self.model.forward_features(x)[:, 0]

    def forward_dense(self, x: Tensor) -> list[Tensor]:
        x = self.normalise(x)
        self._check_size(x)
        return self.model.forward_intermediates(
            x, indices=self.dense_indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )

    def forward_with_dense(self, x: Tensor, level: int = -1) -> tuple[Tensor, Tensor]:
        x = self.normalise(x)
        self._check_size(x)
        tokens, (grid,) = self.model.forward_intermediates(
            x, indices=[self.dense_indices[level]], norm=True, output_fmt="NCHW"
        )
        return tokens[:, 0], grid


class ResNetBackbone(Backbone):
    """timm ResNet; global average pool pooled, the four stages dense."""

    # the average of all four stages: +10 points of linear-probe region accuracy over the last
    # stage alone, DINO or random init (benchmarks/pooled_variants.py)
    default_pool = "multilevel"

    def __init__(self, arch: str, model: nn.Module, input_norm: str = "fixed") -> None:
        super().__init__(arch, model, input_norm)
        self.embed_dim = int(model.num_features)
        self.patch_size = None
        stages = [f for f in model.feature_info if f["module"].startswith("layer")]
        self.dense_channels = [int(f["num_chs"]) for f in stages]
        self.dense_strides = [int(f["reduction"]) for f in stages]
        self.dense_indices = [1, 2, 3, 4]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalise(x))

    def forward_dense(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            self.normalise(x), indices=self.dense_indices, intermediates_only=True
        )

    def forward_with_dense(self, x: Tensor, level: int = -1) -> tuple[Tensor, Tensor]:
        final, (grid,) = self.model.forward_intermediates(self.normalise(x), indices=[self.dense_indices[level]])
        return self.model.forward_head(final), grid


def create_backbone(arch: str, img_size: int = 224, drop_path_rate: float = 0.0,
                    pretrained_path: str | None = None, input_norm: str = "fixed") -> Backbone:
    """Build registered backbone ``arch`` for one-channel input (normalised by ``input_norm``, one of
    :data:`INPUT_NORMS`); optionally load local weights."""
    spec = backbone_spec(arch)
    kwargs: dict[str, Any] = {"pretrained": False, "in_chans": 1, "num_classes": 0,
                              "drop_path_rate": drop_path_rate, **spec.timm_kwargs}
    if spec.family == "vit":
        kwargs.update(img_size=img_size, dynamic_img_size=True, attn_layer=AutocastAttention)
    model = timm.create_model(spec.timm_name, **kwargs)
    family = ViTBackbone if spec.family == "vit" else ResNetBackbone
    backbone: Backbone = family(arch, model, input_norm)
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return backbone


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a .pth/.pt/.bin/.safetensors file and unwrap nested checkpoint containers.

    A folder stands for the ``backbone.safetensors`` exported into it (a pretrain run folder).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "backbone.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist; pass a local .pth/.pt/.safetensors file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means an unusable file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"weights file {p} could not be read as tensors only ({first}); save its "
                             "state dict alone (torch.save(model.state_dict(), path)) and pass that") from exc
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"weights file {p} holds no state dict (top-level keys: {sorted(obj)[:8]})")
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {p} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _fold_to_one_channel(weight: Tensor) -> Tensor:
    """RGB input weights -> gray: a gray image replicated to RGB gives the same response."""
    return weight.sum(dim=1, keepdim=True) if weight.shape[1] != 1 else weight


def _resize_pos_embed(pos: Tensor, target: Tensor, n_prefix: int) -> Tensor:
    if pos.shape == target.shape:
        return pos
    old = round((pos.shape[1] - n_prefix) ** 0.5)
    new = round((target.shape[1] - n_prefix) ** 0.5)
    if old * old + n_prefix != pos.shape[1] or new * new + n_prefix != target.shape[1]:
        raise ValueError(f"cannot resize positional embedding {tuple(pos.shape)} to {tuple(target.shape)}")
    return resample_abs_pos_embed(pos, [new, new], [old, old], num_prefix_tokens=n_prefix)


def load_pretrained(backbone: Backbone, path: str | Path) -> None:
    """Load timm / DINO / HF-style weights into ``backbone`` (RGB stem folded, pos-embed resized)."""
    sd = _strip_prefixes(read_state_dict(path))
    target = backbone.model.state_dict()
    # Classifier / projection-head weights are not part of a backbone.
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith(("head", "fc.", "last_layer"))}
    stem = "patch_embed.proj.weight" if isinstance(backbone, ViTBackbone) else "conv1.weight"
    if stem in sd:
        sd[stem] = _fold_to_one_channel(sd[stem])
    if isinstance(backbone, ViTBackbone) and "pos_embed" in sd:
        n_prefix = 0 if getattr(backbone.model, "no_embed_class", False) else backbone.model.num_prefix_tokens
        sd["pos_embed"] = _resize_pos_embed(sd["pos_embed"], target["pos_embed"], n_prefix)
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    wrong = sorted(k for k in set(sd) & set(target) if sd[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name} {keys[:4]}{'...' if len(keys) > 4 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise ValueError(
            f"weights {path} do not fit backbone {backbone.arch}: {detail}; pass weights of the same "
            "architecture"
        )
    backbone.model.load_state_dict(sd, strict=True)


register_backbone("vit_tiny_patch16", "vit_tiny_patch16_224", "vit")
register_backbone("vit_small_patch16", "vit_small_patch16_224", "vit")
register_backbone("vit_base_patch16", "vit_base_patch16_224", "vit")
register_backbone("vit_small_patch8", "vit_small_patch8_224", "vit")
register_backbone("vit_tiny_patch8", "vit_tiny_patch16_224", "vit", patch_size=8)  # 64 tokens at 64 px
register_backbone("resnet18", "resnet18", "resnet")
register_backbone("resnet50", "resnet50", "resnet")
