"""Turning bundle predictions into files and JSON: shared by ``xrayfm predict`` and the service.

Masks in JSON are COCO-style *uncompressed* RLE: ``{"size": [H, W], "counts": [n0, n1, ...]}``
where the mask is flattened in column-major (Fortran) order and the counts alternate runs of
0 and 1, starting with a (possibly empty) run of 0. ``sum(counts) == H * W``.

A multi-frame file gives one result per frame and an ``aggregate``: region probabilities are the
mean over frames (each frame weighs the same), its top-3 is taken from that mean; metal and
screws are summarised as the number of frames with any metal and the largest screw count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xrayfm.io import DecodedFrame

Spacing = tuple[float, float] | None


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a 2-D boolean mask (column-major, runs start with zeros)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"RLE needs a 2-D mask, got shape {m.shape}")
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: bool (H, W)."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, not H*W = {h * w}; the RLE is corrupt")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


def frame_spacing(frame: DecodedFrame) -> Spacing:
    """(row, col) pixel spacing in mm of a decoded frame, or None when unknown."""
    ps = frame.meta.get("pixel_spacing_mm")
    if not ps or len(ps) != 2:
        return None
    return float(ps[0]), float(ps[1])


def _r(v: float, nd: int = 3) -> float:
    return round(float(v), nd)


def result_json(
    result: dict[str, Any], frame: DecodedFrame | None = None, mask_png: str | None = None
) -> dict[str, Any]:
    """JSON-serialisable form of one ``ModelBundle.predict`` result (arrays become RLE/summary)."""
    out: dict[str, Any] = {"height": result["height"], "width": result["width"]}
    if frame is not None:
        out["frame_index"] = frame.frame_index
        out["num_frames"] = frame.num_frames
        out["pixel_spacing_mm"] = frame_spacing(frame)
        out["spacing_source"] = frame.meta.get("spacing_source")
    if "top3" in result:
        out["top3"] = [{**t, "probability": _r(t["probability"], 4)} for t in result["top3"]]
        out["probabilities"] = {k: _r(v, 4) for k, v in result["probabilities"].items()}
    if "metal_mask" in result:
        mask = result["metal_mask"]
        prob = result["metal_probability"]
        out["metal"] = {
            "area_px": int(mask.sum()),
            "fraction": _r(mask.mean(), 6),
            "max_probability": _r(prob.max() if prob.size else 0.0, 4),
            "mask_rle": rle_encode(mask),
            **({"mask_png": mask_png} if mask_png else {}),
        }
    if "screws" in result:
        out["screws"] = [
            {
                k: ([_r(x, 2) for x in v] if isinstance(v, list) else _r(v, 4) if isinstance(v, float) else v)
                for k, v in s.items()
            }
            for s in result["screws"]
        ]
    if "embedding" in result:
        out["embedding"] = result["embedding"]
    return out


def aggregate(frames: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Run-level summary of per-frame JSON results (see the module docstring)."""
    agg: dict[str, Any] = {"frames": len(frames)}
    probs = [f["probabilities"] for f in frames if "probabilities" in f]
    if probs:
        names = list(probs[0])
        mean = np.mean([[p[n] for n in names] for p in probs], axis=0)
        order = np.argsort(-mean)[:3]
        agg["probabilities_mean"] = {n: _r(v, 4) for n, v in zip(names, mean)}
        agg["top3"] = [{"index": int(i), "region": names[i], "probability": _r(mean[i], 4)} for i in order]
    if any("metal" in f for f in frames):
        agg["frames_with_metal"] = sum(1 for f in frames if f.get("metal", {}).get("area_px", 0) > 0)
    if any("screws" in f for f in frames):
        agg["max_screws_per_frame"] = max(len(f.get("screws", [])) for f in frames)
    return agg
