"""Test-time augmentation (TTA): run the model on mirrored / rotated copies of the input and
average its raw outputs after mapping each back to the input's frame.

Modes: ``none``; ``flip``, the input and its left-right mirror (nnU-Net mirrors by default,
CenterNet flips); ``dihedral``, all 8 rot90/mirror elements of D4 (:func:`~xrayfm.tasks.data.dihedral_item`,
same numbering), for heads trained with ``--dihedral``. Outputs of shape ``(B, C)`` (class logits)
are averaged as they are; maps ``(B, C, H, W)`` (mask logits, keypoint maps) are turned back by
the inverse element first, and channel pairs that hold an ``(x, y)`` vector (a keypoint head's
sub-cell offsets and head<->tip vectors: ``vector_channels``) are also rotated back. Logits are
averaged, not probabilities: one rule for every head, and a map's peaks stay where the views agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from xrayfm.tasks.data import dihedral_inverse, dihedral_linear

TTA_MODES: dict[str, tuple[int, ...]] = {"none": (0,), "flip": (0, 4), "dihedral": tuple(range(8))}


def tta_elements(mode: str) -> tuple[int, ...]:
    """The D4 elements a TTA ``mode`` averages over."""
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation {mode!r} is not one of {', '.join(TTA_MODES)}; "
                         "pass e.g. --tta flip")
    return TTA_MODES[mode]


def dihedral_tensor(t: Tensor, k: int) -> Tensor:
    """``t``'s last two (H, W) dims under D4 element ``k``, as :func:`~xrayfm.tasks.data.dihedral_item`
    moves an image: mirror left-right when ``k >= 4``, then ``k % 4`` counter-clockwise quarter turns."""
    if k >= 4:
        t = t.flip(-1)
    return torch.rot90(t, k % 4, dims=(-2, -1)) if k % 4 else t


def invert_output(out: Tensor, k: int, vector_channels: Sequence[tuple[int, int]] = ()) -> Tensor:
    """A head's output for the input under element ``k``, mapped back to the input's frame."""
    if k == 0 or out.ndim < 4:
        return out
    inv = dihedral_inverse(k)
    y = dihedral_tensor(out, inv)
    if vector_channels:
        y = y.clone()
        m = torch.as_tensor(dihedral_linear(inv), dtype=y.dtype, device=y.device)
        for cx, cy in vector_channels:
            vx, vy = y[:, cx].clone(), y[:, cy]
            y[:, cx] = m[0, 0] * vx + m[0, 1] * vy
            y[:, cy] = m[1, 0] * vx + m[1, 1] * vy
    return y


def tta_mean(run: Callable[[Tensor], Mapping[str, Tensor]], x: Tensor, elements: Sequence[int],
             vector_channels: Mapping[str, Sequence[tuple[int, int]]] | None = None,
             at_identity: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Mean over ``elements`` of ``run``'s named outputs for the transformed ``x`` (``(B, C, H, W)``),
    each mapped back by :func:`invert_output`; ``at_identity`` is ``run(x)`` when already computed."""
    vectors = vector_channels or {}
    total: dict[str, Tensor] = {}
    for k in elements:
        outs = at_identity if k == 0 and at_identity is not None else run(dihedral_tensor(x, k))
        for name, o in outs.items():
            back = invert_output(o.float(), k, vectors.get(name, ()))
            total[name] = back if name not in total else total[name] + back
    return {name: t / len(elements) for name, t in total.items()}
