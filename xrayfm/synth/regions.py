"""Body-region taxonomy and the written rules that name the region an X-ray view shows.

The rules look at which labelled structure groups (:data:`xrayfm.synth.anatomy.GROUPS`) project
into the exposed field: ``coverage[group]`` is the fraction of the field's cells (a 32x32 grid)
that the group's projected voxels touch, and ``spine_offset`` is the distance of the dominant
spine level's projected centre from the image centre, as a fraction of the image width.
First rule that fires wins:

1. skull >= 0.25                                   -> head
2. femur >= 0.05                                   -> hip
3. pelvis_bone + sacrum >= 0.10                    -> pelvis
4. dominant spine level >= 0.04 and offset <= 0.25 -> cervical_spine / thoracic_spine / lumbar_spine
5. shoulder >= 0.08                                -> shoulder
6. lung >= 0.25                                    -> thorax
7. abdomen >= 0.15                                 -> abdomen
8. any spine level >= 0.02                         -> its spine class
9. otherwise the volume's default region (user given, e.g. for unlabelled volumes or limbs)
"""

from __future__ import annotations

import numpy as np

REGIONS: tuple[str, ...] = ("head", "cervical_spine", "shoulder", "thorax", "thoracic_spine", "lumbar_spine",
                            "abdomen", "pelvis", "hip", "upper_limb", "lower_limb")
_SPINE_CLASS = {"cervical": "cervical_spine", "thoracic": "thoracic_spine", "lumbar": "lumbar_spine"}
GRID = 32


def region_index(name: str) -> int:
    """Index of ``name`` in :data:`REGIONS`; a clear error for an unknown name."""
    if name not in REGIONS:
        raise ValueError(f"unknown body region {name!r}; choose one of {', '.join(REGIONS)}")
    return REGIONS.index(name)


def classify_region(coverage: dict[str, float], spine_offset: float | None, default: str) -> str:
    """Apply the written rules (module docstring) to group coverages; ``default`` when none fires."""
    c = {k: float(v) for k, v in coverage.items()}

    def cov(g: str) -> float:
        return c.get(g, 0.0)

    if cov("skull") >= 0.25:
        return "head"
    if cov("femur") >= 0.05:
        return "hip"
    if cov("pelvis_bone") + cov("sacrum") >= 0.10:
        return "pelvis"
    level = max(_SPINE_CLASS, key=cov)
    if cov(level) >= 0.04 and spine_offset is not None and spine_offset <= 0.25:
        return _SPINE_CLASS[level]
    if cov("shoulder") >= 0.08:
        return "shoulder"
    if cov("lung") >= 0.25:
        return "thorax"
    if cov("abdomen") >= 0.15:
        return "abdomen"
    if cov(level) >= 0.02:
        return _SPINE_CLASS[level]
    region_index(default)
    return default


def field_coverage(points_px: dict[str, np.ndarray], open_field: np.ndarray) -> tuple[dict[str, float], float | None]:
    """Group coverages and spine offset from projected group points (pixel x, y) and the open-field mask."""
    n = open_field.shape[0]
    cells = open_field.reshape(GRID, n // GRID, GRID, n // GRID).mean(axis=(1, 3)) > 0.5 \
        if n % GRID == 0 else _resize_bool(open_field, GRID)
    n_open = max(int(cells.sum()), 1)
    coverage: dict[str, float] = {}
    centers: dict[str, np.ndarray] = {}
    for g, pts in points_px.items():
        ok = (pts[:, 0] >= 0) & (pts[:, 0] < n) & (pts[:, 1] >= 0) & (pts[:, 1] < n)
        if not ok.any():
            continue
        cx = (pts[ok, 0] * GRID / n).astype(int)
        cy = (pts[ok, 1] * GRID / n).astype(int)
        hit = np.zeros((GRID, GRID), dtype=bool)
        hit[cy, cx] = True
        coverage[g] = float((hit & cells).sum()) / n_open
        inside = cells[cy, cx]
        if inside.any():
            centers[g] = pts[ok][inside].mean(0)
    spine = [g for g in _SPINE_CLASS if g in coverage]
    offset = None
    if spine:
        level = max(spine, key=lambda g: coverage[g])
        if level in centers:
            offset = float(np.hypot(*(centers[level] - n / 2.0)) / n)
    return coverage, offset


def _resize_bool(mask: np.ndarray, size: int) -> np.ndarray:
    idx = ((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
    return mask[np.ix_(idx, idx)] > 0.5
