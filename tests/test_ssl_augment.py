"""X-ray augmentations and multi-crop views on a real radiograph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xray_images import unit_pixels

from xrayfm.ssl import augment as A
from xrayfm.ssl.multicrop import (
    EpochSampler,
    MultiCropIterableDataset,
    MultiCropMapDataset,
    MultiCropTransform,
    collate_crops,
)


@pytest.fixture(scope="module")
def xray() -> torch.Tensor:
    """The pydicom-data PA chest RG1 (MONOCHROME1, inverted to dense-bright), 96x80, in [0, 1]."""
    cv2 = pytest.importorskip("cv2")
    arr = cv2.resize(unit_pixels("RG1_UNCR.dcm", as_displayed=True), (80, 96), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.clip(arr, 0, 1))[None]


TRANSFORMS = [
    A.RandomResizedCrop(48, (0.2, 0.6)),
    A.RandomFlip(1.0, 0.0),
    A.RandomRotation(20.0, p=1.0),
    A.RandomWindowLevel((0.4, 0.6), p=1.0),
    A.RandomGamma((0.5, 0.6), p=1.0),
    A.RandomContrastBrightness((1.4, 1.5), (0.05, 0.1), p=1.0),
    A.GaussianBlur((1.0, 2.0), p=1.0),
    A.QuantumNoise((300.0, 500.0), p=1.0),
    A.InvertPolarity(p=1.0),
    A.Solarize(0.5, p=1.0),
    A.Collimation(p=1.0),
]


@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: type(t).__name__)
def test_transform_contract(t: A.XrayTransform, xray: torch.Tensor) -> None:
    before = xray.clone()
    out = t(xray, torch.Generator().manual_seed(3))
    expected = (1, 48, 48) if isinstance(t, A.RandomResizedCrop) else tuple(xray.shape)
    assert tuple(out.shape) == expected and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(xray, before), "the input must not be modified in place"
    again = t(xray, torch.Generator().manual_seed(3))
    assert torch.equal(out, again), "same seed must give the same output"
    if out.shape == xray.shape:
        assert (out - xray).abs().mean() > 1e-3, "the transform must change the image"
    other = [t(xray, torch.Generator().manual_seed(s)) for s in range(4, 8)]
    if not isinstance(t, (A.RandomFlip, A.InvertPolarity, A.Solarize)):  # deterministic when fired
        assert any(not torch.equal(out, o) for o in other), "different seeds must differ"


def test_probability_zero_is_identity(xray: torch.Tensor) -> None:
    for t in (A.GaussianBlur(p=0.0), A.QuantumNoise(p=0.0), A.Collimation(p=0.0)):
        assert torch.equal(t(xray, torch.Generator().manual_seed(0)), xray)


def test_transform_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        A.GaussianBlur(p=1.0)(torch.rand(3, 8, 8), torch.Generator())


def test_collimation_blackens_borders(xray: torch.Tensor) -> None:
    t = A.Collimation(max_margin=0.2, p_circle=0.0, p=1.0)
    out = t(xray, torch.Generator().manual_seed(0))
    assert float(out[0, 0].max()) == 0.0 and float(out[0, -1].max()) == 0.0
    assert float(out[0, :, 0].max()) == 0.0 and float(out[0, :, -1].max()) == 0.0
    circ = A.Collimation(p_circle=1.0, p=1.0)(xray, torch.Generator().manual_seed(0))
    assert float(circ[0, 0, 0]) == 0.0 and torch.equal(circ[0, 48, 40], xray[0, 48, 40])


def test_multicrop_shapes_and_seeded_views(xray: torch.Tensor) -> None:
    mc = MultiCropTransform(global_size=64, local_size=32, n_local=3)
    views = mc(xray, torch.Generator().manual_seed(1))
    assert views["global"].shape == (2, 1, 64, 64) and views["local"].shape == (3, 1, 32, 32)
    assert not torch.equal(views["global"][0], views["global"][1])
    again = mc(xray, torch.Generator().manual_seed(1))
    assert torch.equal(views["local"], again["local"])
    batch = collate_crops([views, again, mc(xray, torch.Generator().manual_seed(2))])
    assert batch["global"].shape == (6, 1, 64, 64) and batch["local"].shape == (9, 1, 32, 32)
    # crop-major: rows 0..2 are view 0 of the three samples, rows 3..5 view 1
    assert torch.equal(batch["global"][1], again["global"][0])
    assert torch.equal(batch["global"][4], again["global"][1])


def test_epoch_sampler_shards_skips_and_reshuffles() -> None:
    full = list(EpochSampler(10, seed=0))
    assert sorted(i for i, _ in full) == list(range(10))
    r0 = EpochSampler(10, seed=0, rank=0, world=2)
    r1 = EpochSampler(10, seed=0, rank=1, world=2)
    assert sorted(i for i, _ in [*r0, *r1]) == list(range(10)) and len(r0) == 5
    skipped = EpochSampler(10, seed=0)
    skipped.set_epoch(0, skip=4)
    assert list(skipped) == full[4:]
    skipped.set_epoch(1)
    assert [i for i, _ in skipped] != [i for i, _ in full]


def test_map_and_iterable_wrappers_give_seeded_views(xray: torch.Tensor) -> None:
    mc = MultiCropTransform(global_size=32, local_size=16, n_local=2)
    items = [{"image": xray, "image_id": f"img{i}"} for i in range(3)]
    mapped = MultiCropMapDataset(items, mc)
    a, b = mapped[(1, 7)], mapped[(1, 7)]
    assert torch.equal(a["global"], b["global"])
    stream = MultiCropIterableDataset(items, mc, seed=0)
    first, second = list(stream), list(stream)
    assert torch.equal(first[2]["local"], second[2]["local"])
    stream.set_epoch(1)
    assert not torch.equal(list(stream)[2]["local"], first[2]["local"])
    with pytest.raises(ValueError, match="'image'"):
        MultiCropMapDataset([{"pixels": xray}], mc)[(0, 0)]
