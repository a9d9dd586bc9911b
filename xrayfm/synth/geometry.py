"""Mobile C-arm cone-beam geometry: view parameters -> source, detector frame, 3x4 projection matrix.

World frame: RAS+ millimetres of the CT (+x patient Right, +y Anterior, +z Superior), patient
supine. At LAO = CRAN = 0 the source is posterior (under the table) and the detector anterior,
and the image is shown as an AP radiograph: the patient's right on the image's left, head up.
``lao_deg`` > 0 swings the detector towards the patient's left (LAO), < 0 is RAO; ``cran_deg`` > 0
tilts the detector towards the head (cranial), < 0 caudal (DICOM PositionerPrimary/SecondaryAngle).
Pixels follow :mod:`xrayfm.conventions`: the centre of pixel (row i, col j) is (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np


@dataclass
class View:
    """One C-arm exposure's geometry; all lengths in mm, angles in degrees."""

    isocenter: tuple[float, float, float]  # world point at the rotation centre (table translation)
    lao_deg: float = 0.0
    cran_deg: float = 0.0
    roll_deg: float = 0.0                  # in-plane image rotation
    sid_mm: float = 1000.0                 # source to detector
    sod_mm: float = 600.0                  # source to isocentre
    field_mm: float = 230.0                # detector field of view (II input diameter / panel side)
    circular: bool = True                  # image intensifier (circle) or flat panel (rectangle)
    size: int = 256                        # output pixels per side
    collimator: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # blades: left, top, right, bottom, fraction of side

    @property
    def pixel_mm(self) -> float:
        """Detector pixel pitch in mm."""
        return self.field_mm / self.size

    @property
    def iso_pixel_mm(self) -> float:
        """Pixel spacing at the isocentre plane in mm."""
        return self.pixel_mm * self.sod_mm / self.sid_mm

    def to_json_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json_dict(cls, record: dict) -> View:
        """The view a synth label's ``view`` record (``to_json_dict`` plus extra keys) describes."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})


def rotation(view: View) -> np.ndarray:
    """3x3 matrix whose rows are the detector u (image +x), v (image +y) and d (source->detector) axes."""
    a, b, r = (math.radians(v) for v in (view.lao_deg, view.cran_deg, view.roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rot = rz @ rx
    d = rot @ np.array([0.0, 1.0, 0.0])
    u0 = rot @ np.array([-1.0, 0.0, 0.0])
    v0 = rot @ np.array([0.0, 0.0, -1.0])
    u = math.cos(r) * u0 + math.sin(r) * v0
    v = -math.sin(r) * u0 + math.cos(r) * v0
    return np.stack([u, v, d])


def shift_isocenter(view: View, px: float, angle: float) -> View:
    """``view`` with the isocentre moved ``px`` image pixels (at the isocentre plane) along ``angle``
    (radians, from the image +x axis towards +y) within the detector plane."""
    u, v, _ = rotation(view)
    step = px * view.iso_pixel_mm * (math.cos(angle) * u + math.sin(angle) * v)
    return replace(view, isocenter=tuple(float(a) for a in np.asarray(view.isocenter, dtype=float) + step))


def source_position(view: View) -> np.ndarray:
    """X-ray focal spot in world mm."""
    return np.asarray(view.isocenter, dtype=np.float64) - view.sod_mm * rotation(view)[2]


def projection_matrix(view: View) -> np.ndarray:
    """3x4 matrix P with ``P @ [X, Y, Z, 1] ~ [x, y, 1] * w`` (x, y in pixels, w = depth along d)."""
    f = view.sid_mm / view.pixel_mm
    c = view.size / 2.0
    k = np.array([[f, 0, c], [0, f, c], [0, 0, 1.0]])
    rot = rotation(view)
    s = source_position(view)
    return k @ np.hstack([rot, -(rot @ s)[:, None]])


def project(p: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Project (N, 3) world points with a 3x4 matrix -> (N, 2) pixel (x, y)."""
    h = np.hstack([points, np.ones((len(points), 1))]) @ p.T
    return h[:, :2] / h[:, 2:3]


def pixel_rays(view: View, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Ray origin (3,) and unit directions (size, size, 3) through every pixel centre (+ ``offset`` px)."""
    rot = rotation(view)
    n = view.size
    cx = (np.arange(n) + 0.5 + offset[0] - n / 2.0) * view.pixel_mm
    cy = (np.arange(n) + 0.5 + offset[1] - n / 2.0) * view.pixel_mm
    uu, vv = np.meshgrid(cx, cy)  # uu varies along columns (x), vv along rows (y)
    dirs = uu[..., None] * rot[0] + vv[..., None] * rot[1] + view.sid_mm * rot[2]
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return source_position(view), dirs


def _edge_weight(dist: np.ndarray, feather: float) -> np.ndarray:
    return np.clip(dist / feather + 0.5, 0.0, 1.0)


def field_mask(view: View, feather_px: float = 1.5) -> np.ndarray:
    """Detector field weight per pixel in [0, 1]: the II circle (feathered) or 1 for a flat panel."""
    n = view.size
    c = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(c, c)
    if not view.circular:
        return np.ones((n, n), dtype=np.float32)
    return _edge_weight(0.5 - np.hypot(xx - 0.5, yy - 0.5), feather_px / n).astype(np.float32)


def collimator_mask(view: View, feather_px: float = 2.5) -> np.ndarray:
    """Open-beam weight per pixel in [0, 1]: 0 behind a collimator blade, feathered at its edge."""
    n = view.size
    c = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(c, c)
    left, top, right, bottom = view.collimator
    w = np.ones((n, n))
    for dist in (xx - left, yy - top, (1 - right) - xx, (1 - bottom) - yy):
        w = w * _edge_weight(dist, feather_px / n)
    return w.astype(np.float32)
