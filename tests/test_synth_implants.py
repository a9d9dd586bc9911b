"""Screw labels against the rendered metal: head/tip inside the mask, mask axis = head->tip angle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xrayfm.synth.anatomy import find_vertebrae, group_points
from xrayfm.synth.construct import spinal_construct
from xrayfm.synth.geometry import View, collimator_mask, field_mask
from xrayfm.synth.implants import make_kwire, make_screw
from xrayfm.synth.phantom import make_phantom
from xrayfm.synth.physics import Exposure
from xrayfm.synth.render import prepare_volume
from xrayfm.synth.scene import Scene, metal_integrals, render_scene

VIEWS = [{"lao_deg": 0.0}, {"lao_deg": 90.0}, {"lao_deg": -40.0, "cran_deg": 12.0}, {"lao_deg": 25.0, "roll_deg": 8.0},
         {"lao_deg": -80.0, "cran_deg": -15.0, "field_mm": 120.0}]


@pytest.fixture(scope="module")
def phantom_scene() -> Scene:
    vol = make_phantom(voxel_mm=3.0)
    verts = find_vertebrae(vol)
    assert [v.name for v in verts] == ["T10", "T11", "T12", "L1", "L2", "L3"]
    implants = spinal_construct(verts, 4, np.random.default_rng(5), center_level=3)
    assert sum(i.kind == "screw" for i in implants) == 4
    return Scene(volume=prepare_volume(vol, voxel_mm=3.0), group_points=group_points(vol), implants=implants,
                 default_region="lumbar_spine", vertebrae=verts)


@pytest.mark.parametrize("params", VIEWS)
def test_head_and_tip_fall_in_metal_mask(phantom_scene: Scene, params: dict) -> None:
    target = np.mean([s.tip for s in phantom_scene.implants if s.kind == "screw"], axis=0)
    view = View(isocenter=tuple(target), size=128, **params)
    r = render_scene(phantom_scene, view, Exposure(), np.random.default_rng(0))
    assert len(r.screws) == 4 and r.mask.any()
    exposed = (field_mask(view) > 0.5) & (collimator_mask(view) > 0.5)
    checked = 0
    for s in r.screws:
        for key in ("head", "tip"):
            x, y = s[key]
            inside = 0 <= x < 128 and 0 <= y < 128
            assert s[f"{key}_visible"] == (inside and bool(exposed[int(y), int(x)])), (key, s)
            if inside and s["visible"]:
                assert r.mask[int(y), int(x)], (key, s)
                checked += 1
        x0, y0, x1, y1 = s["box"]
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        assert s["end_on"] == (s["length_px"] < 12 * 128 / 256)
    assert checked >= 4
    assert r.image[r.mask].mean() > np.median(r.image[r.image > 0]) + 0.1  # metal renders bright


def _principal_angle(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    pts = np.stack([xs, ys], axis=1).astype(float)
    cov = np.cov((pts - pts.mean(0)).T)
    _w, v = np.linalg.eigh(cov)
    return math.degrees(math.atan2(v[1, -1], v[0, -1]))


@pytest.mark.parametrize("lao,cran,roll", [(0, 0, 0), (90, 0, 0), (-45, 10, 5), (30, -20, -8), (70, 15, 0)])
def test_mask_axis_matches_head_tip_angle(lao: float, cran: float, roll: float) -> None:
    from xrayfm.synth.scene import screw_label

    direction = np.array([0.3, 0.9, -0.25])
    screw = make_screw(np.array([10.0, 20.0, 5.0]), direction, 45.0, 6.5, "titanium")
    view = View(isocenter=(0.0, 0.0, 0.0), lao_deg=lao, cran_deg=cran, roll_deg=roll, size=128)
    _, (path,) = metal_integrals([screw], view)
    label = screw_label(screw, path, view, np.ones((128, 128), dtype=bool))
    assert label["length_px"] >= 20 and not label["end_on"]  # these views all show the screw side-on
    diff = (_principal_angle(path > 0) - label["angle_deg"]) % 180.0
    assert min(diff, 180.0 - diff) < 2.0, label


def test_kwire_is_thin_and_long() -> None:
    wire = make_kwire(np.array([0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), 200.0, 1.6)
    view = View(isocenter=(0.0, -80.0, 0.0), lao_deg=90.0, size=128)
    _, (path,) = metal_integrals([wire], view)
    cols = np.nonzero((path > 0).any(axis=0))[0]
    rows = np.nonzero((path > 0).any(axis=1))[0]
    assert len(cols) > 60 and len(rows) <= 4
    assert path.max() == pytest.approx(1.6, abs=0.15)
