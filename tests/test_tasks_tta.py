"""Test-time augmentation: outputs mapped back to the input's frame exactly, and averaged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tasks_rods import rod_item

from xrayfm.models.backbones import create_backbone
from xrayfm.models.heads import N_HEATMAPS, VECTOR_CHANNELS
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import DIHEDRAL_ELEMENTS, dihedral_item, hflip_item
from xrayfm.tasks.detect import decode_screws, encode_screws
from xrayfm.tasks.train import HeadTrainConfig, predict_items, train_head
from xrayfm.tasks.tta import dihedral_tensor, invert_output, tta_elements, tta_mean


def _as_head_output(item, stride: int) -> torch.Tensor:
    """The encoded targets of ``item`` laid out as a keypoint head's output (one image)."""
    t = encode_screws(item.screws, *item.size, stride=stride, superimposed=True)
    heat = torch.logit(t["heat"].clamp(1e-4, 1 - 1e-4))
    return torch.cat([heat[:N_HEATMAPS], t["reg"], heat[N_HEATMAPS:]])[None]


@pytest.mark.parametrize("k", range(DIHEDRAL_ELEMENTS))
@pytest.mark.parametrize("stride", [4, 2])
def test_keypoint_maps_of_a_transformed_image_invert_to_the_originals(k: int, stride: int) -> None:
    """Screw targets encoded on the image under element k, turned back with their offsets and
    head<->tip vectors, equal the targets of the image itself; decoded, the same screws."""
    items = [rod_item(seed, size=64, n_max=3) for seed in range(12)]
    assert sum(len(it.screws) for it in items) >= 12
    for item in items:
        original = _as_head_output(item, stride)
        back = invert_output(_as_head_output(dihedral_item(item, k), stride), k, VECTOR_CHANNELS)
        assert torch.allclose(back, original, atol=1e-5)
        assert decode_screws(back, stride=stride) == decode_screws(original, stride=stride)
    if k:  # without turning the vectors back, the screws decode elsewhere
        moved = _as_head_output(dihedral_item(items[0], k), stride)
        if items[0].screws:
            assert not torch.allclose(invert_output(moved, k), _as_head_output(items[0], stride), atol=1e-5)


@pytest.mark.parametrize("k", range(DIHEDRAL_ELEMENTS))
def test_maps_follow_the_items_dihedral_and_logits_pass_through(k: int) -> None:
    item = rod_item(3, size=64)
    image = torch.from_numpy(item.image)[None, None]
    assert torch.equal(dihedral_tensor(image, k)[0, 0], torch.from_numpy(dihedral_item(item, k).image))
    assert torch.equal(invert_output(dihedral_tensor(image, k), k), image)
    logits = torch.randn(2, 5)
    assert invert_output(logits, k) is logits  # class scores do not move


def test_tta_mean_of_an_equivariant_model_is_the_model() -> None:
    """A blur with a D4-symmetric kernel commutes with every element, so each view maps back to the
    same output; a model that is not symmetric gives views that differ, and the mean of both."""
    x = torch.from_numpy(rod_item(4, size=64).image)[None, None]
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])[None, None] / 16

    def blur(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": F.conv2d(t, kernel, padding=1), "logits": t.mean((2, 3))}

    for mode in ("flip", "dihedral"):
        out = tta_mean(blur, x, tta_elements(mode))
        assert torch.allclose(out["mask"], blur(x)["mask"], atol=1e-6)
        assert torch.allclose(out["logits"], blur(x)["logits"], atol=1e-6)

    def shift(t: torch.Tensor) -> dict[str, torch.Tensor]:  # moves everything one pixel right
        return {"mask": torch.roll(t, 1, dims=-1)}

    flipped = tta_mean(shift, x, tta_elements("flip"))["mask"]
    expected = (torch.roll(x, 1, dims=-1) + torch.roll(x, -1, dims=-1)) / 2
    assert torch.allclose(flipped, expected)
    given = {"mask": torch.zeros_like(x)}  # a precomputed identity view is used, not recomputed
    assert torch.allclose(tta_mean(shift, x, (0, 4), at_identity=given)["mask"], torch.roll(x, -1, dims=-1) / 2)


def test_unknown_tta_mode_names_the_choices() -> None:
    assert tta_elements("none") == (0,) and tta_elements("flip") == (0, 4) and len(tta_elements("dihedral")) == 8
    with pytest.raises(ValueError, match="none, flip, dihedral"):
        tta_elements("rotate")


def test_predict_items_with_flip_averages_the_mirrored_items_logits() -> None:
    """Through the real backbone, head and predict path: the flip-averaged mask logits are the mean
    of the item's and of its mirror's (mirrored back)."""
    torch.manual_seed(0)
    items = [rod_item(i, size=64) for i in range(6)]
    bb = create_backbone("resnet18", img_size=64)
    head, _ = train_head(bb, items, HeadTrainConfig(task="segment", img_size=64, epochs=1, batch_size=6,
                                                    head_width=16))
    task = get_task("segment")
    plain = predict_items(bb, head, task, items, 64, soft=True)
    mirrored = predict_items(bb, head, task, [hflip_item(it) for it in items], 64, soft=True)
    flipped = predict_items(bb, head, task, items, 64, soft=True, tta="flip")
    for p, m, f in zip(plain, mirrored, flipped):
        assert torch.allclose(torch.logit(torch.from_numpy(f).double(), eps=1e-6),
                              (torch.logit(torch.from_numpy(p).double(), eps=1e-6)
                               + torch.logit(torch.from_numpy(m[:, ::-1].copy()).double(), eps=1e-6)) / 2, atol=1e-3)
    assert not all(torch.allclose(torch.from_numpy(p), torch.from_numpy(f), atol=1e-3) for p, f in zip(plain, flipped))
