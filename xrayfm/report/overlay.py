"""The prediction overlay (the paper's Figure 2 panel): image, metal tint, screws, top-3 text.

Drawn with OpenCV on an RGB copy of the image at its original size: the predicted metal mask
tinted red, each screw's box in yellow with its confidence, its head as a green dot and its tip
as a cyan dot joined by a line, and the top-3 regions with probabilities in the top-left corner.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

MASK_RGB = (255, 40, 40)
BOX_RGB = (255, 220, 0)
HEAD_RGB = (0, 230, 0)
TIP_RGB = (0, 200, 255)


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float) -> None:
    thick = max(1, round(scale * 2))
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def draw_overlay(image: np.ndarray, result: dict[str, Any], alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3) overlay of one prediction ``result`` (ModelBundle.predict) on ``image``."""
    gray = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    canvas = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    mask = result.get("metal_mask")
    if mask is not None and mask.any():
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(MASK_RGB, np.float32)
    out = np.ascontiguousarray(canvas.round().astype(np.uint8))
    h, w = gray.shape
    scale = max(0.3, min(h, w) / 700)
    lw = max(1, round(min(h, w) / 300))
    for s in result.get("screws") or []:
        x0, y0, x1, y1 = (round(v) for v in s["box"])
        cv2.rectangle(out, (x0, y0), (x1, y1), BOX_RGB, lw)
        head = tuple(round(v) for v in s["head"])
        tip = tuple(round(v) for v in s["tip"])
        cv2.line(out, head, tip, TIP_RGB, lw, cv2.LINE_AA)
        r = max(2, lw * 2)
        cv2.circle(out, head, r, HEAD_RGB, -1, cv2.LINE_AA)
        cv2.circle(out, tip, r, TIP_RGB, -1, cv2.LINE_AA)
        _text(out, f"{s['confidence']:.2f}", (x0, max(y0 - 3, int(12 * scale * 2))), scale * 0.8)
    line_h = int(30 * scale) + 4
    for i, t in enumerate(result.get("top3") or []):
        _text(out, f"{t['region']} {t['probability']:.2f}", (4, (i + 1) * line_h), scale)
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    """PNG encoding of a uint8 gray (H, W) or RGB (H, W, 3) array."""
    a = np.ascontiguousarray(arr)
    if a.ndim == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {arr.shape}")
    return buf.tobytes()
