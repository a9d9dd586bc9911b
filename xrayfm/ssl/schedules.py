"""Per-step schedules (pure functions of the step, so a resumed run needs only the step)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> float:
    """Linear warm-up ``warmup_start -> base`` over ``warmup_steps``, then cosine ``base -> final``.

    The cosine reaches ``final`` exactly at the last step (``total_steps - 1``) and stays there.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start -> end`` linearly over ``warmup_steps``, then ``end`` (e.g. the teacher temperature)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
