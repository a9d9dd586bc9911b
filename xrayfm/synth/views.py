"""Random but plausible mobile C-arm views, with the CT's cut ends hidden behind collimator blades.

Projections: AP (|LAO| <= 15) 40 %, lateral (|LAO| 75-95) 30 %, oblique (20-60) 30 %; cranial /
caudal tilt within +-20 degrees; image intensifier (circle; 9" field 230 mm or zoom 170 / 120 mm)
or 30 cm flat panel (rectangle, 200-300 mm field); SID 950-1050 mm, SOD 550-650 mm; dose
300-3000 photons per pixel; random extra collimation in a third of the views. Wherever a ray
would cross the body outline where the scan ends, a blade is moved in to cover it, so the CT's
straight superior/inferior edges never reach the image (views that would lose more than half
the field are re-drawn).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from xrayfm.synth.geometry import View, field_mask
from xrayfm.synth.physics import Exposure
from xrayfm.synth.render import PreparedVolume, truncated_rays

_MAX_BLADE = 0.45


def random_view(rng: np.random.Generator, target: np.ndarray, size: int) -> View:
    """Draw view angles, detector and a table position whose isocentre is near ``target``."""
    kind = rng.choice(3, p=[0.4, 0.3, 0.3])
    sign = 1.0 if rng.random() < 0.5 else -1.0
    lao = [rng.uniform(-15, 15), sign * rng.uniform(75, 95), sign * rng.uniform(20, 60)][kind]
    cran = float(np.clip(rng.normal(0, 8), -20, 20))
    circular = rng.random() < 0.6
    field = float(rng.choice([230.0, 230.0, 170.0, 120.0])) if circular else float(rng.uniform(200, 300))
    iso = np.asarray(target, dtype=float) + rng.normal(0, [12, 8, 15])
    collimator = tuple(float(v) for v in rng.uniform(0.0, 0.18, 4) * (rng.random(4) < 0.35)) \
        if rng.random() < 0.35 else (0.0, 0.0, 0.0, 0.0)
    return View(isocenter=(float(iso[0]), float(iso[1]), float(iso[2])), lao_deg=float(lao), cran_deg=cran,
                roll_deg=float(np.clip(rng.normal(0, 4), -12, 12)), sid_mm=float(rng.uniform(950, 1050)),
                sod_mm=float(rng.uniform(550, 650)), field_mm=field, circular=bool(circular), size=size,
                collimator=collimator)  # type: ignore[arg-type]


def random_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(dose=float(math.exp(rng.uniform(math.log(300), math.log(3000)))),
                    blur_px=float(rng.uniform(0.6, 1.2)), vignetting=float(rng.uniform(0.1, 0.35)),
                    collimator_mu_t=float(rng.uniform(0.8, 2.0)), edge_gain=float(rng.uniform(0.4, 1.2)),
                    edge_sigma_px=float(rng.uniform(4.0, 14.0)),
                    gamma=float(rng.uniform(0.8, 1.2)))


def hide_truncation(pv: PreparedVolume, view: View) -> View | None:
    """Close blades over rays that cross the scan's cut ends; None if less than half the field stays open."""
    bad = truncated_rays(pv, view) & (field_mask(view) > 0.01)
    if not bad.any():
        return view
    n = view.size
    rows = np.nonzero(bad.any(axis=1))[0]
    left, top, right, bottom = view.collimator
    upper, lower = rows[rows < n / 2], rows[rows >= n / 2]
    margin = 3.0 / n
    if len(upper):
        top = max(top, (upper.max() + 1) / n + margin)
    if len(lower):
        bottom = max(bottom, (n - lower.min()) / n + margin)
    if top > _MAX_BLADE or bottom > _MAX_BLADE:
        return None
    return replace(view, collimator=(left, top, right, bottom))


def plausible_view(rng: np.random.Generator, pv: PreparedVolume, target: np.ndarray, size: int,
                   tries: int = 25) -> View:
    """A random view near ``target`` with truncation hidden; moves the target towards the scan's middle on retries."""
    mid_z = 0.5 * (pv.z_lo + pv.z_hi)
    for i in range(tries):
        t = np.array(target, dtype=float)
        t[2] = t[2] + (mid_z - t[2]) * min(1.0, i / (tries - 1) * 1.5)
        view = hide_truncation(pv, random_view(rng, t, size))
        if view is not None:
            return view
    raise ValueError(f"{pv.name}: no view keeps half its field inside the scanned body; "
                     "the volume is too short for C-arm views (use a longer scan or a smaller field)")
