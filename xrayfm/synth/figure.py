"""Label overlays and contact sheets of synth output (the docs' grid figure, visual checks)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from xrayfm.config import atomic_write_bytes
from xrayfm.synth.labels import SynthLabel


def overlay(image: np.ndarray, label: SynthLabel) -> np.ndarray:
    """RGB uint8 view of ``image`` (float [0, 1]) with the metal mask tinted, screw boxes, heads and tips."""
    g = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], axis=-1).astype(np.float32)
    tint = np.array([255.0, 60.0, 60.0])
    rgb[label.mask] = 0.55 * rgb[label.mask] + 0.45 * tint
    out = rgb.astype(np.uint8).copy()
    scale = image.shape[0] / 256.0
    for s in label.screws:
        if not s["visible"]:
            continue
        x0, y0, x1, y1 = (round(v) for v in s["box"])
        colour = (255, 200, 0) if s["end_on"] else (0, 220, 255)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, 1)
        for key, c in (("head", (0, 255, 0)), ("tip", (255, 0, 255))):
            x, y = s[key]
            cv2.circle(out, (round(x - 0.5), round(y - 0.5)), max(2, int(2 * scale)), c, -1)
    cv2.putText(out, label.region, (4, out.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35 * scale,
                (255, 255, 0), 1, cv2.LINE_AA)
    return out


def contact_sheet(tiles: list[np.ndarray], cols: int, gap: int = 2) -> np.ndarray:
    """Tile equally sized RGB or gray uint8 images into one RGB image."""
    tiles = [t if t.ndim == 3 else np.stack([t] * 3, axis=-1) for t in tiles]
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // cols)
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t
    return sheet


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, buf.tobytes())


def demo_grid(out_png: str | Path, size: int = 256, seed: int = 0, cache: str | None = None) -> None:
    """The docs figure: demo CT as AP / lateral / oblique / cranial-oblique views, without screws (row 1),
    with a 4-screw construct (row 2), and row 2 with its labels drawn (row 3)."""
    from xrayfm.conventions import from_uint16, to_uint16
    from xrayfm.synth.construct import spinal_construct
    from xrayfm.synth.generate import SynthConfig, load_ct, prepare_base
    from xrayfm.synth.geometry import View
    from xrayfm.synth.physics import Exposure
    from xrayfm.synth.scene import Scene, render_scene
    from xrayfm.synth.views import hide_truncation

    cfg = SynthConfig(out=str(Path(out_png).parent), seed=seed, cache=cache)
    base = prepare_base(cfg, load_ct(cfg))
    rng = np.random.default_rng(seed)
    level = next(i for i, v in enumerate(base.vertebrae) if v.name == "T11")
    screws = spinal_construct(base.vertebrae, 4, rng, center_level=level)
    target = np.mean([s.tip for s in screws if s.kind == "screw"], axis=0)
    plain = Scene(base.volume, base.group_points, [], base.default_region, base.vertebrae)
    fitted = Scene(base.volume, base.group_points, screws, base.default_region, base.vertebrae)
    views = [View(tuple(target), 0.0, 0.0, size=size), View(tuple(target), 90.0, 0.0, size=size),
             View(tuple(target), -40.0, 10.0, size=size, circular=False, field_mm=260.0),
             View(tuple(target), 30.0, 15.0, size=size, field_mm=170.0)]
    rows: list[list[np.ndarray]] = [[], [], []]
    for view in views:
        view = hide_truncation(base.volume, view) or view
        for k, scene in enumerate((plain, fitted)):
            r = render_scene(scene, view, Exposure(dose=1500.0), np.random.default_rng(seed))
            img = from_uint16(to_uint16(r.image))
            rows[k].append((img * 255).astype(np.uint8))
            if k == 1:
                from xrayfm.synth.labels import SynthLabel

                lb = SynthLabel("", r.region, size, size, view.iso_pixel_mm, r.mask, r.screws)
                rows[2].append(overlay(img, lb))
    save_png(out_png, contact_sheet(rows[0] + rows[1] + rows[2], cols=len(views)))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Render the synth grid figure from the demo CT.")
    ap.add_argument("--out", default="docs/images/synth_grid.png")
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    demo_grid(a.out, a.size)
    print(f"wrote {a.out}")
