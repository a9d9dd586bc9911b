"""Anatomy-aware SSL: window/part geometry, loss terms by hand, stage schedule, real training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ddp_runs import train_two_ranks
from test_ssl_trainer import tiny_cfg
from xray_images import real_xrays

from xrayfm.config import ConfigError, from_dict, to_dict
from xrayfm.models import create_backbone, load_backbone
from xrayfm.ssl import PretrainConfig, Trainer, build_method, train
from xrayfm.ssl.anatomy import composability_loss, decomposability_loss, part_whole_similarity
from xrayfm.ssl.anatomy_views import (
    AnatomyConfig,
    AnatomyTransform,
    part_boxes,
    random_window,
    staged_granularity,
)
from xrayfm.ssl.checkpoint import load_checkpoint
from xrayfm.ssl.multicrop import AugmentConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def anatomy_cfg(**kw: object) -> PretrainConfig:
    base: dict[str, object] = {"method": "anatomy", "epochs": 3, "anatomy": AnatomyConfig()}
    return tiny_cfg(**{**base, **kw})


# -- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 64), (37, 53), (101, 9), (8, 8), (300, 171)])
@pytest.mark.parametrize("grid", [(2, 2), (3, 2), (1, 4)])
def test_parts_tile_every_window_exactly_inside_the_image(height: int, width: int,
                                                          grid: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(height * 1000 + width)
    for gran in range(4):
        if (height >> gran) < grid[0] or (width >> gran) < grid[1]:
            with pytest.raises(ValueError, match="grid of parts|no granularity"):
                part_boxes(random_window(height, width, gran, g), grid)
            continue
        for _ in range(5):
            top, left, wh, ww = window = random_window(height, width, gran, g)
            assert (wh, ww) == (height // 2**gran, width // 2**gran)
            assert 0 <= top and top + wh <= height and 0 <= left and left + ww <= width
            count = np.zeros((height, width), dtype=int)
            boxes = part_boxes(window, grid)
            assert len(boxes) == grid[0] * grid[1]
            for t, lft, h, w in boxes:
                assert h >= 1 and w >= 1
                count[t:t + h, lft:lft + w] += 1
            inside = np.zeros_like(count)
            inside[top:top + wh, left:left + ww] = 1
            assert np.array_equal(count, inside)  # no gap, no overlap, nothing outside the window
            sizes = {(h, w) for _, _, h, w in boxes}
            assert max(h for h, _ in sizes) - min(h for h, _ in sizes) <= 1


def test_windows_cover_every_position_and_are_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    tops = {random_window(40, 40, 1, g)[0] for _ in range(400)}
    assert tops == set(range(21))  # every position 0..40-20 is reachable
    a = random_window(99, 77, 2, torch.Generator().manual_seed(5))
    assert a == random_window(99, 77, 2, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="no granularity-3 window"):
        random_window(7, 40, 3, g)


def test_views_of_the_transform() -> None:
    img = real_xrays(1, 64)[0]["image"]
    cfg = AnatomyConfig(parts_grid=(2, 3))
    t = AnatomyTransform(cfg, global_size=32, local_size=16, n_local=3, global_scale=(0.4, 1.0),
                         local_scale=(0.1, 0.4))
    views = t(img, torch.Generator().manual_seed(1))
    assert views["global"].shape == (2, 1, 32, 32) and views["local"].shape == (3, 1, 16, 16)
    assert views["parts"].shape == (6, 1, 16, 16) and int(views["granularity"]) == 0
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in views.values())
    again = t(img, torch.Generator().manual_seed(1))
    assert all(torch.equal(views[k], again[k]) for k in views)


def test_parts_show_their_quadrant_of_the_window() -> None:
    """Without photometric noise, the mean of the part views equals the whole view's content."""
    img = real_xrays(1, 64)[0]["image"]
    quiet = AugmentConfig(flip_p=0, rotate_p=0, window_p=0, gamma_p=0, contrast_p=0, noise_p=0, invert_p=0,
                          solarize_p=0, collimation_p=0)
    t = AnatomyTransform(AnatomyConfig(), global_size=32, local_size=32, n_local=0, global_scale=(1.0, 1.0),
                         local_scale=(0.1, 0.4), aug=quiet)
    t.whole_view.transforms, t.part_view.transforms = [], []  # drop the random blur as well
    t.granularity = 1
    v = t(img, torch.Generator().manual_seed(3))
    whole = F.interpolate(v["global"][:1], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    quads = [whole[:32, :32], whole[:32, 32:], whole[32:, :32], whole[32:, 32:]]
    for part, quad in zip(v["parts"][:, 0], quads):
        assert torch.corrcoef(torch.stack([part.flatten(), quad.flatten()]))[0, 1] > 0.95


# -- schedules -----------------------------------------------------------------------------------

def test_staged_granularity_splits_epochs_evenly() -> None:
    assert [staged_granularity(e, 6, (0, 1, 2)) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [staged_granularity(e, 7, (0, 1, 2)) for e in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert [staged_granularity(e, 4, (1, 3)) for e in range(4)] == [1, 1, 3, 3]


def test_random_schedule_draws_each_granularity_per_image() -> None:
    img = real_xrays(1, 64)[0]["image"]
    t = AnatomyTransform(AnatomyConfig(schedule="random"), 32, 16, 0, (0.4, 1.0), (0.1, 0.4))
    drawn = [int(t(img, torch.Generator().manual_seed(s))["granularity"]) for s in range(60)]
    assert set(drawn) == {0, 1, 2} and min(drawn.count(k) for k in (0, 1, 2)) >= 10
    assert drawn == [int(t(img, torch.Generator().manual_seed(s))["granularity"]) for s in range(60)]


# -- loss terms ----------------------------------------------------------------------------------

def test_composability_by_hand() -> None:
    composed = torch.tensor([[3.0, 4.0], [0.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 7.0]], requires_grad=True)
    # [0.6, 0.8] vs [1, 0]: 0.16 + 0.64 = 0.8; [0, -1] vs [0, 1]: 4.0; mean 2.4
    loss = composability_loss(composed, teacher)
    assert loss.item() == pytest.approx(2.4, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and composed.grad is not None


def test_decomposability_normalises_each_chunk() -> None:
    decomposed = torch.tensor([[3.0, 4.0, 0.0, 2.0]], requires_grad=True)  # chunks [3, 4], [0, 2]
    parts = torch.tensor([[[1.0, 0.0], [0.0, 5.0]]])                          # (B=1, P=2, D=2)
    # chunk 0: [0.6, 0.8] vs [1, 0] -> 0.8; chunk 1: [0, 1] vs [0, 1] -> 0; mean over parts 0.4
    assert decomposability_loss(decomposed, parts).item() == pytest.approx(0.4, rel=1e-6)
    perfect = torch.tensor([[2.0, 0.0, 0.0, 9.0]])
    assert decomposability_loss(perfect, parts).item() == pytest.approx(0.0, abs=1e-7)
    # the reference's whole-vector normalisation cannot reach 0 for the same prediction
    whole_norm = F.normalize(perfect, dim=-1).view(1, 2, 2)
    assert (whole_norm - F.normalize(parts, dim=-1)).pow(2).sum(-1).mean().item() > 0.1


def test_method_loss_is_the_weighted_sum_of_its_terms(tmp_path: Path) -> None:
    weights = AnatomyConfig(localizability_weight=0.5, composability_weight=2.0, decomposability_weight=3.0)
    trainer = Trainer(anatomy_cfg(anatomy=weights), tmp_path, real_xrays(8), show_progress=False)
    views = [trainer.transform(it["image"], torch.Generator().manual_seed(i)) for i, it in enumerate(real_xrays(4))]
    batch = trainer.method.collate(views)
    assert batch["parts"].shape == (16, 1, 16, 16) and batch["global"].shape == (8, 1, 32, 32)
    stats = trainer.train_step(batch)
    expected = 0.5 * stats["localizability"] + 2.0 * stats["composability"] + 3.0 * stats["decomposability"]
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert 0 < stats["composability"] < 4 and 0 < stats["decomposability"] < 4


# -- training through the real trainer -----------------------------------------------------------

def test_staged_training_exports_an_anatomy_backbone(tmp_path: Path) -> None:
    summary = train(anatomy_cfg(), tmp_path, real_xrays(8), show_progress=False)
    assert summary.steps == 6 and math.isfinite(summary.loss)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["granularity"] for r in records] == [0, 0, 1, 1, 2, 2]  # 2 steps per epoch, 3 stages
    for key in ("loss", "localizability", "composability", "decomposability", "teacher_entropy"):
        assert all(math.isfinite(r[key]) for r in records), key
    model, card = load_backbone(str(tmp_path))
    assert card["method"] == "anatomy" and card["finished"] and card["config"]["anatomy"]["schedule"] == "staged"
    sims = part_whole_similarity(model, [it["image"] for it in real_xrays(3)], granularity=1, size=32)
    assert sims.shape == (12,) and bool(((sims >= -1) & (sims <= 1)).all())


def test_random_schedule_trains(tmp_path: Path) -> None:
    summary = train(anatomy_cfg(epochs=1, anatomy=AnatomyConfig(schedule="random")), tmp_path, real_xrays(8),
                    show_progress=False)
    assert summary.steps == 2 and math.isfinite(summary.loss)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r["granularity"] not in (0.0, 1.0, 2.0) for r in records)  # images of one batch mix g


def test_resume_continues_to_the_same_weights(tmp_path: Path) -> None:
    items = real_xrays(12)  # 3 steps per epoch: step 4 is in the second stage
    straight = train(anatomy_cfg(max_steps=4), tmp_path / "a", items, show_progress=False)
    train(anatomy_cfg(max_steps=2), tmp_path / "b", items, show_progress=False)
    resumed = train(anatomy_cfg(max_steps=4), tmp_path / "b", items, resume=True, show_progress=False)
    assert straight.steps == resumed.steps == 4 and resumed.resumed_from == 2
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pth")["method"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pth")["method"]
    assert any(k.startswith("student.compose.") for k in a)
    for key, value in a.items():
        assert torch.allclose(value, b[key], atol=1e-6, rtol=0), key
    with pytest.raises(ConfigError, match="anatomy"):
        train(anatomy_cfg(max_steps=5, anatomy=AnatomyConfig(composability_weight=0.5)), tmp_path / "b", items,
              show_progress=False)


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path: Path) -> None:
    r0, r1 = train_two_ranks(anatomy_cfg(max_steps=2), tmp_path)
    assert any(k.startswith("student.decompose.") for k in r0)
    for key in r0:  # compose/decompose MLPs included: their gradients are all-reduced too
        assert torch.equal(r0[key], r1[key]), key
    _, card = load_backbone(str(tmp_path / "run"))
    assert card["method"] == "anatomy"


# -- part-whole measure and config ---------------------------------------------------------------

def test_part_whole_similarity_by_hand() -> None:
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", img_size=32).eval()
    img = real_xrays(1, 64)[0]["image"]
    sims = part_whole_similarity(model, [img], granularity=0, size=32, part_size=16)
    with torch.no_grad():
        whole = model(F.interpolate(img[None], size=(32, 32), mode="bilinear", antialias=True))
        quads = [img[:, :32, :32], img[:, :32, 32:], img[:, 32:, :32], img[:, 32:, 32:]]
        parts = model(torch.stack([F.interpolate(q[None], size=(16, 16), mode="bilinear", antialias=True)[0]
                                   for q in quads])).mean(0, keepdim=True)
    assert sims.shape == (1,)
    assert sims.item() == pytest.approx(F.cosine_similarity(whole, parts).item(), abs=1e-5)
    two = [img, real_xrays(2, 64)[1]["image"]]
    with torch.no_grad():
        w = torch.cat([model(F.interpolate(x[None], size=(32, 32), mode="bilinear", antialias=True)) for x in two])
        p = torch.stack([model(torch.stack([F.interpolate(x[None, :, r:r + 32, c:c + 32], size=(16, 16),
                                                          mode="bilinear", antialias=True)[0]
                                            for r in (0, 32) for c in (0, 32)])) for x in two])  # (2, 4, D)
    mu = torch.cat([w, p.flatten(0, 1)]).mean(0)
    centred = part_whole_similarity(model, two, size=32, part_size=16, centre=True)
    assert torch.allclose(centred, F.cosine_similarity(w - mu, (p - mu).mean(1)), atol=1e-5)
    flat = torch.full((1, 48, 48), 0.4)  # parts identical to the whole at the same size: cos = 1
    assert part_whole_similarity(model, [flat], size=32, part_size=32).item() == pytest.approx(1.0, abs=1e-5)


def test_config_from_yaml_dict_and_errors() -> None:
    data = to_dict(anatomy_cfg())
    data["anatomy"] = {"schedule": "random", "granularities": [0, 2], "parts_grid": [2, 2]}
    cfg = from_dict(PretrainConfig, data)
    assert cfg.anatomy.granularities == (0, 2) and cfg.anatomy.schedule == "random"
    with pytest.raises(ConfigError, match="anatomy.schedule"):
        build_method(anatomy_cfg(anatomy=AnatomyConfig(schedule="linear")))
    with pytest.raises(ConfigError, match="epochs >= 3"):
        build_method(anatomy_cfg(epochs=2))
    with pytest.raises(ConfigError, match="parts_grid"):
        build_method(anatomy_cfg(anatomy=AnatomyConfig(parts_grid=(1, 1))))
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PretrainConfig, {**data, "anatomy": {"shedule": "random"}})
