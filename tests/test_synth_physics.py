"""Image formation: bone brighter than lung, quantum noise following dose, table removed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xrayfm.io.volume import CTVolume, load_volume
from xrayfm.synth.anatomy import group_points
from xrayfm.synth.geometry import View, collimator_mask, field_mask, project, projection_matrix
from xrayfm.synth.phantom import make_phantom
from xrayfm.synth.physics import Exposure, expose
from xrayfm.synth.render import body_mask, line_integrals, prepare_volume

SHARED_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"


def _volume(kind: str) -> CTVolume:
    if kind == "phantom":
        return make_phantom(voxel_mm=3.0)
    ct, seg = SHARED_CT / "abdomen_pelvis_ct_small.nii.gz", SHARED_CT / "abdomen_pelvis_ct_small_seg.nii.gz"
    if not (ct.is_file() and seg.is_file()):
        pytest.skip(f"shared CT not found at {SHARED_CT} (only the phantom case runs without ../shared)")
    return load_volume(ct, labels=seg)


def _render(vol: CTVolume, view: View, exp: Exposure, seed: int) -> np.ndarray:
    pv = prepare_volume(vol, voxel_mm=3.0)
    li = line_integrals(pv, view)
    return expose(li, np.zeros_like(li), field_mask(view), collimator_mask(view), exp, np.random.default_rng(seed))


def _mean_at(img: np.ndarray, pts_px: np.ndarray) -> float:
    n = img.shape[0]
    ij = np.floor(pts_px).astype(int)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < n) & (ij[:, 1] >= 0) & (ij[:, 1] < n)
    assert ok.sum() > 20
    return float(img[ij[ok, 1], ij[ok, 0]].mean())


@pytest.mark.parametrize("kind", ["phantom", "shared"])
def test_bone_brighter_than_lung(kind: str) -> None:
    vol = _volume(kind)
    pts = group_points(vol, stride_mm=3.0)
    spine = np.vstack([pts[g] for g in ("thoracic", "lumbar") if g in pts])
    target = 0.5 * (spine.mean(0) + pts["lung"].mean(0))
    view = View(isocenter=tuple(target), lao_deg=0.0, size=128, field_mm=300.0, circular=False)
    img = _render(vol, view, Exposure(dose=3000.0), seed=0)
    p = projection_matrix(view)
    bone = _mean_at(img, project(p, spine))
    lung = _mean_at(img, project(p, pts["lung"]))
    assert bone > lung + 0.1, (bone, lung)


def test_noise_std_follows_dose() -> None:
    vol = make_phantom(voxel_mm=3.0)
    view = View(isocenter=(0.0, 0.0, 0.0), lao_deg=10.0, size=128)
    centre = np.zeros((128, 128), dtype=bool)
    centre[32:96, 32:96] = True
    stds = {}
    for dose in (250.0, 1000.0, 4000.0):
        exp = Exposure(dose=dose, vignetting=0.0)
        a, b = _render(vol, view, exp, seed=1), _render(vol, view, exp, seed=2)
        inside = centre & (a > 0.02) & (a < 0.98) & (b > 0.02) & (b < 0.98)
        stds[dose] = float(np.std((a - b)[inside]) / np.sqrt(2.0))
    assert stds[250.0] / stds[1000.0] == pytest.approx(2.0, rel=0.12)
    assert stds[1000.0] / stds[4000.0] == pytest.approx(2.0, rel=0.12)


def test_table_is_removed_and_scan_padding_is_air() -> None:
    vol = make_phantom(voxel_mm=4.0)
    hu = vol.hu.copy()
    hu[:3] = -2048.0  # "outside the scan field" padding
    mask = body_mask(hu)
    table = (vol.hu > 200) & (vol.labels == 0)
    table &= np.abs(np.indices(vol.hu.shape)[1] * 4.0 - 130.0 + 110.0) < 8.0
    assert table.any() and not mask[table].any()
    pv = prepare_volume(CTVolume(hu=hu, affine=vol.affine, name="p"), voxel_mm=4.0)
    assert float(pv.mu[:3].max()) == 0.0 and float(pv.mu.max()) > 0.02
