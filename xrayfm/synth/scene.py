"""One exposure of a scene (patient volume + implants) through one C-arm view -> image and labels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from xrayfm.io.volume import CTVolume
from xrayfm.synth.anatomy import Vertebra, label_names
from xrayfm.synth.geometry import (
    View,
    collimator_mask,
    field_mask,
    pixel_rays,
    project,
    projection_matrix,
    shift_isocenter,
)
from xrayfm.synth.implants import Implant
from xrayfm.synth.physics import Exposure, expose
from xrayfm.synth.regions import classify_region, field_coverage
from xrayfm.synth.render import PreparedVolume, block_mean, line_integrals, truncated_rays, world_box

END_ON_PX_AT_256 = 12.0
VERTEBRA_MIN_PATH_MM = 2.0  # a pixel is vertebra when its ray runs this far through vertebra voxels


@dataclass
class Scene:
    """A patient: attenuation volume, labelled group points (world), implants, default region."""

    volume: PreparedVolume
    group_points: dict[str, np.ndarray]
    implants: list[Implant] = field(default_factory=list)
    default_region: str = "thorax"
    vertebrae: list[Vertebra] = field(default_factory=list)
    vertebra_volume: PreparedVolume | None = None  # vertebra occupancy (see vertebra_volume())


@dataclass
class Rendered:
    image: np.ndarray                  # float32 (H, W) in [0, 1], dense bright
    mask: np.ndarray                   # bool (H, W): ray meets metal (inside the detector field)
    screws: list[dict]
    region: str
    coverage: dict[str, float]
    vertebra_mask: np.ndarray | None = None  # bool (H, W): ray runs > 2 mm through vertebrae; None: no labels


def vertebra_volume(vol: CTVolume, pv: PreparedVolume) -> PreparedVolume | None:
    """Vertebra occupancy on ``pv``'s grid, cropped to the vertebrae; None without vertebra labels.

    Each voxel holds the fraction of its source voxels labelled ``vertebrae_*`` (block mean like
    :func:`~xrayfm.synth.render.prepare_volume`), so the line integral of this volume is the
    path length (mm) of a ray through vertebrae. ``pv`` must be ``prepare_volume(vol)``, unmoved.
    """
    if vol.labels is None:
        return None
    ids = [lid for lid, name in label_names(vol).items() if name.startswith("vertebrae_")]
    occ = np.isin(vol.labels, ids)
    box = ndimage.find_objects(occ.astype(np.uint8))
    if not box:
        return None
    scale = np.linalg.norm(pv.affine[:3, :3], axis=0) / np.linalg.norm(vol.affine[:3, :3], axis=0)
    f = np.round(scale).astype(int)  # pv's pooling factor per axis
    # crop on whole pooling blocks so the pooled crop is a sub-grid of pv's grid
    start = np.array([sl.start for sl in box[0]]) // f * f
    stop = np.minimum(-(-np.array([sl.stop for sl in box[0]]) // f) * f, occ.shape)
    frac = np.ascontiguousarray(block_mean(occ[tuple(slice(a, b) for a, b in zip(start, stop))], f))
    shift = np.eye(4)
    shift[:3, 3] = start // f
    affine = pv.affine @ shift
    lo_idx, hi_idx = np.full(3, -0.5), np.array(frac.shape) - 0.5
    body_lo, body_hi = world_box(lo_idx, hi_idx, affine)
    return PreparedVolume(mu=frac, affine=affine, body_lo=body_lo, body_hi=body_hi, z_lo=pv.z_lo, z_hi=pv.z_hi,
                          name=f"{pv.name} vertebrae", body_idx_lo=lo_idx, body_idx_hi=hi_idx)


def metal_integrals(implants: list[Implant], view: View, ss: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """Metal line integral (mean over ``ss`` x ``ss`` sub-pixel rays) and, per implant, the largest
    sub-ray path length (mm) per pixel, so a pixel counts as metal when any part of it is."""
    n = view.size
    p = projection_matrix(view)
    offsets = [((i + 0.5) / ss - 0.5, (j + 0.5) / ss - 0.5) for j in range(ss) for i in range(ss)]
    rays = [pixel_rays(view, o) for o in offsets]
    total = np.zeros((n, n))
    per: list[np.ndarray] = []
    for imp in implants:
        path = np.zeros((n, n))
        xy = project(p, imp.corners())
        x0, y0 = np.floor(xy.min(0)).astype(int) - 1
        x1, y1 = np.ceil(xy.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, n), min(y1, n)
        if x1 > x0 and y1 > y0:
            for src, dirs in rays:
                sub = imp.path_length(src, dirs[y0:y1, x0:x1].reshape(-1, 3)).reshape(y1 - y0, x1 - x0)
                total[y0:y1, x0:x1] += imp.mu * sub / len(rays)
                path[y0:y1, x0:x1] = np.maximum(path[y0:y1, x0:x1], sub)
        per.append(path)
    return total, per


def _point_visible(p: np.ndarray, visible_px: np.ndarray) -> bool:
    """Whether the pixel under point ``p`` (x, y) is inside the image and exposed."""
    j, i = math.floor(p[0]), math.floor(p[1])
    return bool(0 <= i < visible_px.shape[0] and 0 <= j < visible_px.shape[1] and visible_px[i, j])


def screw_label(imp: Implant, path: np.ndarray, view: View, visible_px: np.ndarray) -> dict:
    """Head/tip points, box, visibility (any exposed pixel; and per end: ``head_visible``,
    ``tip_visible``), projected angle/length and end-on flag of one screw."""
    p = projection_matrix(view)
    head, tip = project(p, np.stack([imp.head, imp.tip]))  # type: ignore[list-item]
    dx, dy = tip - head
    length = float(math.hypot(dx, dy))
    angle = math.degrees(math.atan2(dy, dx))
    if angle <= -180.0:
        angle += 360.0
    hit = (path > 0) & visible_px
    if hit.any():
        rows, cols = np.nonzero(hit)
        box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
    else:
        n = view.size
        lo, hi = np.clip(np.minimum(head, tip), 0, n), np.clip(np.maximum(head, tip), 0, n)
        box = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    return {"head": [float(head[0]), float(head[1])], "tip": [float(tip[0]), float(tip[1])], "box": box,
            "visible": bool(hit.any()), "head_visible": _point_visible(head, visible_px),
            "tip_visible": _point_visible(tip, visible_px), "end_on": length < END_ON_PX_AT_256 * view.size / 256.0,
            "angle_deg": angle, "length_px": length, "material": imp.material}


def fill_truncated(line_int: np.ndarray, truncated: np.ndarray) -> np.ndarray:
    """Replace rays that cross the scan's cut ends by a smooth continuation of their neighbours.

    Those pixels lie behind collimator blades (see :mod:`xrayfm.synth.views`) and the blades are
    semi-transparent, so the missing tissue would otherwise show the CT's straight edge.
    """
    if not truncated.any():
        return line_int
    valid = (~truncated).astype(np.float32)
    sigma = line_int.shape[0] / 12.0
    num = cv2.GaussianBlur(line_int * valid, (0, 0), sigma)
    den = cv2.GaussianBlur(valid, (0, 0), sigma)
    fallback = float(np.median(line_int[~truncated])) if valid.any() else float(line_int.mean())
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), fallback)
    return np.where(truncated, fill, line_int).astype(np.float32)


def render_scene(scene: Scene, view: View, exposure: Exposure, rng: np.random.Generator) -> Rendered:
    """Render ``scene`` through ``view``: tissue + metal line integrals, detection, labels."""
    truncated = truncated_rays(scene.volume, view)
    tissue = fill_truncated(line_integrals(scene.volume, view), truncated)
    metal, paths = metal_integrals(scene.implants, view)
    fld = field_mask(view)
    beam = collimator_mask(view)
    image = expose(tissue, metal, fld, beam, exposure, rng)
    in_field = fld > 0.5
    mask = (metal > 0) & in_field
    exposed = in_field & (beam > 0.5)
    screws = [screw_label(imp, path, view, exposed) for imp, path in zip(scene.implants, paths)
              if imp.kind == "screw"]
    region, coverage = view_region(scene, view, exposed)
    vertebra_mask = None
    if scene.vertebra_volume is not None:
        # truncated rays show a smooth fill, not the CT's bone, so they are not labelled vertebra
        path_mm = line_integrals(scene.vertebra_volume, view)
        vertebra_mask = (path_mm > VERTEBRA_MIN_PATH_MM) & in_field & ~truncated
    return Rendered(image=image, mask=mask, screws=screws, region=region, coverage=coverage,
                    vertebra_mask=vertebra_mask)


def exposed_mask(view: View) -> np.ndarray:
    """Pixels inside the detector field and the collimator's open beam (bool, size x size)."""
    return (field_mask(view) > 0.5) & (collimator_mask(view) > 0.5)


def view_region(scene: Scene, view: View, exposed: np.ndarray | None = None) -> tuple[str, dict[str, float]]:
    """Body region (and group coverages) that ``view`` shows; cheap: projects the group points only."""
    if exposed is None:
        exposed = exposed_mask(view)
    if not scene.group_points:
        return scene.default_region, {}
    p = projection_matrix(view)
    pts = {g: project(p, w) for g, w in scene.group_points.items()}
    coverage, offset = field_coverage(pts, exposed.astype(np.float32))
    return classify_region(coverage, offset, scene.default_region), coverage


def region_changes(scene: Scene, view: View, px: float, directions: int = 8) -> set[str]:
    """Regions other than ``view``'s own that the rules name when the C-arm moves ``px`` image pixels
    in any of ``directions`` evenly spread directions of the detector plane: empty when the label
    is stable at that margin."""
    exposed = exposed_mask(view)  # moving the isocentre keeps it
    own = view_region(scene, view, exposed)[0]
    moved = {view_region(scene, shift_isocenter(view, px, 2 * math.pi * k / directions), exposed)[0]
             for k in range(directions)}
    return moved - {own}
