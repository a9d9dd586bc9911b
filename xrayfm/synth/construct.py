"""Plausible surgical hardware placed from the vertebra labels: pedicle screws, rods, K-wires, plates.

Pedicle screws enter posterolaterally and aim anteromedially through the pedicle into the
vertebral body: medial convergence 5-12 degrees (thoracic) / 10-20 degrees (lumbar), a caudal
tilt of -3..10 degrees, the tip at 70-85 % of the body depth, bilaterally at adjacent levels.
Diameters 4.5-6.5 mm thoracic, 5.5-7.5 mm lumbar/cervicothoracic; lengths 30-55 mm within
what the body depth allows. Two or more screws on one side get a rod through their tulips.
"""

from __future__ import annotations

import math

import numpy as np

from xrayfm.synth.anatomy import Vertebra
from xrayfm.synth.implants import Implant, make_kwire, make_plate, make_rod, make_screw

_ANTERIOR = np.array([0.0, 1.0, 0.0])
_RIGHT = np.array([1.0, 0.0, 0.0])
_SUPERIOR = np.array([0.0, 0.0, 1.0])


def pedicle_screw(v: Vertebra, side: int, rng: np.random.Generator, material: str) -> Implant:
    """Screw through the pedicle of ``v`` on ``side`` (+1 patient right, -1 left)."""
    lumbar = v.name.startswith("L")
    medial = math.radians(rng.uniform(10, 20) if lumbar else rng.uniform(5, 12))
    caudal = math.radians(rng.uniform(-3, 10))
    diameter = float(rng.choice([5.5, 6.5, 7.5] if lumbar else [4.5, 5.0, 5.5, 6.5]))
    canal_to_front = v.body_center[1] + v.body_depth / 2.0 - v.canal_center[1]
    length = float(np.clip(round(rng.uniform(0.9, 1.1) * canal_to_front * 1.1 / 5) * 5, 30, 55))
    direction = (math.cos(medial) * _ANTERIOR - side * math.sin(medial) * _RIGHT) * math.cos(caudal) \
        - math.sin(caudal) * _SUPERIOR
    tip_depth = v.body_center[1] + v.body_depth * (rng.uniform(0.70, 0.85) - 0.5)
    tip = v.body_center.copy()
    tip[1] = tip_depth
    tip += side * v.body_width * rng.uniform(0.12, 0.2) * _RIGHT
    screw = make_screw(tip, direction, length, diameter, material)
    screw.meta.update(level=v.name, side="right" if side > 0 else "left")
    return screw


def spinal_construct(vertebrae: list[Vertebra], n_screws: int, rng: np.random.Generator,
                     center_level: int | None = None) -> list[Implant]:
    """``n_screws`` pedicle screws bilaterally over adjacent levels, with rods where a side has >= 2."""
    if n_screws <= 0 or not vertebrae:
        return []
    levels = max(1, math.ceil(n_screws / 2))
    levels = min(levels, len(vertebrae))
    start_max = len(vertebrae) - levels
    if center_level is None:
        start = int(rng.integers(0, start_max + 1))
    else:
        start = int(np.clip(center_level - levels // 2, 0, start_max))
    material = "titanium" if rng.random() < 0.7 else "steel"
    sides = [1, -1] if rng.random() < 0.5 else [-1, 1]
    screws: list[Implant] = []
    for i in range(n_screws):
        v = vertebrae[start + (i // 2) % levels]
        screws.append(pedicle_screw(v, sides[i % 2], rng, material))
    out = list(screws)
    for side in (1, -1):
        name = "right" if side > 0 else "left"
        heads = [s.head for s in screws if s.head is not None and s.meta["side"] == name]
        if len(heads) >= 2 and rng.random() < 0.8:
            heads.sort(key=lambda h: h[2])
            out.append(make_rod(heads[0] - 2.0 * _ANTERIOR, heads[-1] - 2.0 * _ANTERIOR, material=material))
    return out


def kwire(v: Vertebra, rng: np.random.Generator) -> Implant:
    """A guide wire docked in a pedicle, its free end leaving the back of the body."""
    side = 1 if rng.random() < 0.5 else -1
    medial = math.radians(rng.uniform(5, 20))
    direction = math.cos(medial) * _ANTERIOR - side * math.sin(medial) * _RIGHT \
        - math.radians(rng.uniform(-10, 15)) * _SUPERIOR
    tip = v.body_center + side * 0.15 * v.body_width * _RIGHT
    return make_kwire(tip, direction, float(rng.uniform(150, 230)), float(rng.choice([1.6, 2.0, 2.5])))


def anterior_plate(vertebrae: list[Vertebra], rng: np.random.Generator) -> Implant | None:
    """A plate on the anterolateral surface of two to three vertebral bodies."""
    if len(vertebrae) < 2:
        return None
    n = min(len(vertebrae), int(rng.integers(2, 4)))
    i = int(rng.integers(0, len(vertebrae) - n + 1))
    top, bottom = vertebrae[i], vertebrae[i + n - 1]
    side = 1 if rng.random() < 0.5 else -1
    angle = math.radians(rng.uniform(20, 60))
    normal = math.cos(angle) * _ANTERIOR + side * math.sin(angle) * _RIGHT

    def surface(v: Vertebra) -> np.ndarray:
        return v.body_center + normal * (0.5 * min(v.body_width, v.body_depth) + 1.5)

    a, b = surface(bottom) - 0.35 * bottom.height * _SUPERIOR, surface(top) + 0.35 * top.height * _SUPERIOR
    length = float(np.linalg.norm(b - a))
    return make_plate(a, b - a, normal, length, width=float(rng.uniform(12, 16)),
                      material="titanium" if rng.random() < 0.6 else "steel")
