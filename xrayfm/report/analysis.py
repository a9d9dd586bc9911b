"""Numbers behind the report figures: ViT CLS attention of the last block, and 2-D PCA."""

from __future__ import annotations

import numpy as np
import torch

from xrayfm.models.backbones import ViTBackbone


@torch.no_grad()
def cls_attention(backbone: ViTBackbone, image: np.ndarray) -> np.ndarray:
    """Attention of the CLS token to every patch in the LAST block, per head: ``(heads, h, w)``.

    ``image`` is float32 ``(H, W)`` in [0, 1] with H, W divisible by the patch size. The block's
    input is captured by a hook and the softmax(q k^T / sqrt(d)) row of the CLS query is
    recomputed from the block's own qkv projection (timm's fused attention never materialises it).
    """
    model = backbone.model
    block = model.blocks[-1]
    attn = block.attn
    captured: list[torch.Tensor] = []
    hook = block.norm1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        backbone(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None])
    finally:
        hook.remove()
    x = captured[-1]
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
    prefix = model.num_prefix_tokens
    patch = int(backbone.patch_size)  # type: ignore[arg-type]
    gh, gw = image.shape[0] // patch, image.shape[1] // patch
    return weights[0, :, 0, prefix:].reshape(heads, gh, gw).numpy()


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection of the rows of ``x (N, D)`` on their first two principal components ``(N, 2)``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 embeddings as an (N, D) array, got shape {a.shape}")
    a = a - a.mean(axis=0)
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    out = a @ vt[:2].T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
