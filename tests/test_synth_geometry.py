"""C-arm geometry and the DRR projector: the 3x4 matrix, both projectors, hidden scan ends."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfm.io.volume import CTVolume
from xrayfm.synth.geometry import View, field_mask, pixel_rays, project, projection_matrix, shift_isocenter
from xrayfm.synth.phantom import make_phantom
from xrayfm.synth.render import line_integrals, prepare_volume, truncated_rays
from xrayfm.synth.views import hide_truncation, plausible_view

VIEWS = [{"lao_deg": 0.0}, {"lao_deg": 90.0}, {"lao_deg": -35.0, "cran_deg": 15.0, "roll_deg": 7.0},
         {"lao_deg": 50.0, "cran_deg": -20.0, "sid_mm": 980.0, "sod_mm": 560.0, "field_mm": 170.0}]


def _bead_volume(bead_world: np.ndarray) -> CTVolume:
    """Water box (2 mm voxels) with a dense 2x2x2-voxel bead centred on ``bead_world``."""
    shape = (100, 80, 90)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-99.0, -79.0, -89.0]  # voxel centres at -99 .. +99 mm
    hu = np.zeros(shape, dtype=np.float32)
    idx = np.linalg.solve(affine, np.append(bead_world, 1.0))[:3]
    lo = np.round(idx - 0.5).astype(int)
    assert np.allclose(lo + 0.5, idx), "bead must sit on a voxel corner"
    hu[lo[0]:lo[0] + 2, lo[1]:lo[1] + 2, lo[2]:lo[2] + 2] = 8000.0
    return CTVolume(hu=hu, affine=affine, name="bead")


@pytest.mark.parametrize("params", VIEWS)
def test_known_point_projects_where_the_matrix_says(params: dict) -> None:
    bead = np.array([18.0, -22.0, 32.0])  # a voxel corner: the 2x2x2 bead is centred on it
    vol = _bead_volume(bead)
    plain = CTVolume(hu=np.zeros_like(vol.hu), affine=vol.affine, name="water")
    view = View(isocenter=(5.0, -3.0, 12.0), size=128, **params)
    diff = line_integrals(prepare_volume(vol, voxel_mm=2.0), view) - \
        line_integrals(prepare_volume(plain, voxel_mm=2.0), view)
    w = np.clip(diff, 0, None)
    w = np.where(w > 0.3 * w.max(), w, 0.0)
    ys, xs = np.mgrid[0:128, 0:128] + 0.5
    centroid = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
    expected = project(projection_matrix(view), bead[None])[0]
    assert np.linalg.norm(centroid - expected) < 0.35, (centroid, expected)


def test_pixel_rays_pass_through_pixel_centres() -> None:
    view = View(isocenter=(0.0, 0.0, 0.0), lao_deg=30.0, cran_deg=-10.0, roll_deg=5.0, size=64)
    src, dirs = pixel_rays(view)
    pts = src + 700.0 * dirs.reshape(-1, 3)
    xy = project(projection_matrix(view), pts).reshape(64, 64, 2)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    assert np.allclose(xy[..., 0], xs, atol=1e-6) and np.allclose(xy[..., 1], ys, atol=1e-6)


@pytest.mark.parametrize("params", VIEWS)
def test_isocentre_shift_moves_the_image_by_that_many_pixels(params: dict) -> None:
    view = View(isocenter=(5.0, -3.0, 12.0), size=128, **params)
    for px, angle in ((1.0, 0.0), (4.0, np.pi / 2), (8.0, 2.0)):
        moved = shift_isocenter(view, px, angle)
        # the old isocentre lies in the new isocentre plane, so it shows px pixels the other way
        seen = project(projection_matrix(moved), np.array([view.isocenter]))[0]
        assert np.allclose(seen, [64 - px * np.cos(angle), 64 - px * np.sin(angle)], atol=1e-6), (px, angle, seen)
        assert (moved.lao_deg, moved.cran_deg, moved.roll_deg, moved.size) == \
            (view.lao_deg, view.cran_deg, view.roll_deg, view.size)
    record = {**view.to_json_dict(), "projection_matrix": projection_matrix(view).tolist(), "dose": 1.0}
    assert View.from_json_dict(record) == view  # the synth label's record round trip, extra keys ignored


def test_ap_view_shows_patient_right_on_image_left() -> None:
    view = View(isocenter=(0.0, 0.0, 0.0), size=64)
    right, head = project(projection_matrix(view), np.array([[50.0, 0, 0], [0, 0, 50.0]]))
    assert right[0] < 32 and head[1] < 32


def test_warp_and_grid_projectors_agree() -> None:
    pv = prepare_volume(make_phantom(voxel_mm=4.0), voxel_mm=4.0)
    for params in VIEWS[:3]:
        view = View(isocenter=(0.0, -10.0, 0.0), size=64, **params)
        a = line_integrals(pv, view, method="warp")
        b = line_integrals(pv, view, method="grid", step_vox=0.5)
        assert np.abs(a - b).mean() < 0.01 * a.mean(), params
        assert a.max() > 1.0


def test_scan_ends_are_hidden_behind_blades() -> None:
    pv = prepare_volume(make_phantom(voxel_mm=4.0, length_mm=160.0), voxel_mm=4.0)
    view = View(isocenter=(0.0, 0.0, 25.0), lao_deg=20.0, cran_deg=10.0, size=64)
    assert truncated_rays(pv, view).any()
    fixed = hide_truncation(pv, view)
    assert fixed is not None and fixed.collimator[1] > 0
    from xrayfm.synth.geometry import collimator_mask

    open_field = (collimator_mask(fixed) > 0.01) & (field_mask(fixed) > 0.01)
    assert not (truncated_rays(pv, fixed) & open_field).any()
    rng = np.random.default_rng(3)
    for _ in range(5):
        v = plausible_view(rng, pv, np.array([0.0, 0.0, 70.0]), 64)
        assert not (truncated_rays(pv, v) & (collimator_mask(v) > 0.01) & (field_mask(v) > 0.01)).any()
