"""The patch-level DINO term: view coordinates, cell pairing, loss by hand, training through it."""

from __future__ import annotations

import math

import pytest
import torch
from xray_images import real_xrays

from xrayfm.config import ConfigError
from xrayfm.models.backbones import create_backbone
from xrayfm.ssl import PretrainConfig, build_method
from xrayfm.ssl import augment as A
from xrayfm.ssl.dino import DenseDinoLoss, cell_positions, match_cells
from xrayfm.ssl.multicrop import MultiCropTransform, collate_crops
from xrayfm.ssl.registry import Progress

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _grid(size: int, flip: bool = False, x0: float = 0.0, width: float = 1.0) -> torch.Tensor:
    """Coordinate map (3, size, size) of a view showing source x in [x0, x0 + width] (all of y)."""
    x = x0 + width * (torch.arange(size) + 0.5) / size
    y = (torch.arange(size) + 0.5) / size
    if flip:
        x = x.flip(0)
    ys, xs = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xs, ys, torch.ones(size, size)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_source_coordinates_replay_the_views_geometry(seed: int) -> None:
    """A view of an image that IS its x (or y) coordinate equals the coordinate map's channel."""
    h, w = 40, 32
    side = max(h, w)
    ramps = [((torch.arange(w) + 0.5) / side).expand(h, w), ((torch.arange(h) + 0.5) / side)[:, None].expand(h, w)]
    pipe = A.Pipeline([A.RandomResizedCrop(24, (0.3, 1.0)), A.RandomFlip(0.5, 0.5), A.RandomRotation(15.0, p=1.0),
                       A.RandomGamma(p=1.0), A.QuantumNoise(p=1.0)])
    geometric = A.Pipeline(pipe.transforms[:3])
    for channel, ramp in enumerate(ramps):
        g = torch.Generator().manual_seed(seed)
        coords = A.source_coordinates(pipe, (h, w), g)
        state = g.get_state()
        view = geometric(ramp[None].clone(), g)
        assert torch.equal(state, torch.Generator().manual_seed(seed).get_state())  # g was not advanced
        assert coords.shape == (3, 24, 24)
        assert torch.allclose(view[0], coords[channel], atol=1e-6)
    assert coords[2, 12, 12] == pytest.approx(1.0) and coords[2].min() >= 0.0
    assert coords[2].min() < 1.0  # the rotation uncovered the corners


def test_multicrop_coords_leave_the_views_unchanged() -> None:
    img = real_xrays(1, size=48)[0]["image"]
    plain = MultiCropTransform(32, 16, 2)(img, torch.Generator().manual_seed(5))
    with_coords = MultiCropTransform(32, 16, 2, coords=True)(img, torch.Generator().manual_seed(5))
    assert torch.equal(plain["global"], with_coords["global"]) and torch.equal(plain["local"], with_coords["local"])
    assert with_coords["global_coords"].shape == (2, 3, 32, 32)
    other = MultiCropTransform(32, 16, 2, coords=True)(img, torch.Generator().manual_seed(6))
    batch = collate_crops([with_coords, other])
    assert batch["global_coords"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["global_coords"][1], other["global_coords"][0])  # crop-major like "global"
    assert torch.equal(batch["global_coords"][2], with_coords["global_coords"][1])


def test_cells_pair_by_image_position() -> None:
    coords = torch.stack([_grid(8), _grid(8, flip=True), _grid(8, x0=0.0, width=0.5), _grid(8, x0=0.5, width=0.5)])
    xy, ok, axes = cell_positions(coords, (2, 2))
    assert torch.allclose(xy[0], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    assert ok.all()
    # one cell step across / down the view, in the source: mirrored x for view 1, half as wide for view 2
    expected = torch.tensor([[[0.5, 0.0], [0.0, 0.5]], [[-0.5, 0.0], [0.0, 0.5]], [[0.25, 0.0], [0.0, 0.5]]])
    assert torch.allclose(axes[:3], expected)
    index, matched = match_cells(xy[:1], ok[:1], xy[1:2], ok[1:2], axes[1:2])
    assert index.tolist() == [[1, 0, 3, 2]] and matched.all()  # the mirror cell
    _, matched = match_cells(xy[2:3], ok[2:3], xy[3:4], ok[3:4], axes[3:4])
    assert not matched.any()  # left and right halves share no position (nearest centres a cell apart)
    _, matched = match_cells(xy[2:3], ok[2:3], xy[:1], ok[:1], axes[:1])
    assert matched.all()  # every left-half cell lies inside a cell of the whole view
    uncovered = coords[1:2].clone()
    uncovered[:, :, :, :4] = 0.0  # a rotation left the left half of view 1 black
    xy_u, ok_u, _ = cell_positions(uncovered, (2, 2))
    assert ok_u.tolist() == [[False, True, False, True]]
    _, matched = match_cells(xy[:1], ok[:1], xy_u, ok_u, axes[1:2])
    assert matched.tolist() == [[True, False, True, False]]  # their partners were the uncovered cells


def test_dense_loss_matches_hand_computation() -> None:
    """One image, a 1 x 2 grid, 3 prototypes; view 1 is the mirror of view 0."""
    s = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 2.0, 0.0], [0.3, -0.2, 0.1]]]  # (view, cell, K)
    t = [[[0.2, 0.1, 0.0], [0.0, 0.3, 0.1]], [[0.1, 0.1, 0.4], [0.3, 0.0, 0.0]]]
    ts, tt = 0.1, 0.04
    coords = torch.stack([_grid(4), _grid(4, flip=True)])
    crit = DenseDinoLoss(out_dim=3, student_temp=ts, center_momentum=0.9)
    loss, stats = crit(torch.tensor(s)[:, None], torch.tensor(t)[:, None], coords, teacher_temp=tt)
    q = [[_softmax([v / tt for v in cell]) for cell in view] for view in t]
    logp = [[[math.log(p) for p in _softmax([v / ts for v in cell])] for cell in view] for view in s]
    # student cell c of view v sits where the teacher's cell 1 - c of the other view sits
    terms = [-sum(qk * lk for qk, lk in zip(q[1 - v][1 - c], logp[v][c])) for v in (0, 1) for c in (0, 1)]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    assert stats["dense_matched"].item() == 1.0
    entropy = sum(-sum(p * math.log(p) for p in cell) for view in q for cell in view) / 4
    assert stats["dense_teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    mean_t = torch.tensor(t).reshape(4, 3).mean(0)
    assert torch.allclose(crit.center[0], 0.1 * mean_t)
    apart = torch.stack([_grid(4, x0=0.0, width=0.5), _grid(4, x0=0.5, width=0.5)])
    student = torch.tensor(s, requires_grad=True)
    loss, stats = crit(student[:, None], torch.tensor(t)[:, None], apart, teacher_temp=tt)
    loss.backward()
    assert loss.item() == 0.0 and stats["dense_matched"].item() == 0.0 and not student.grad.any()


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16"])
def test_backbone_gives_pooled_and_one_dense_map_in_one_pass(arch: str) -> None:
    bb = create_backbone(arch, img_size=64).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = bb.forward_dense(x)
        for level in (-1, -2, 0):
            pooled, grid = bb.forward_with_dense(x, level)
            assert torch.allclose(pooled, bb(x), atol=1e-5) and torch.allclose(grid, dense[level], atol=1e-5)


@pytest.mark.parametrize(("arch", "level"), [("resnet18", -2), ("vit_tiny_patch16", -1)])
def test_dense_term_trains_through_the_method(arch: str, level: int) -> None:
    cfg = PretrainConfig(arch=arch, global_size=64, local_size=32, n_local=1, out_dim=32, hidden_dim=32,
                         bottleneck_dim=16, dense_weight=0.5, dense_out_dim=24, dense_hidden_dim=32,
                         dense_level=level, precision="fp32", freeze_last_layer_epochs=1)
    method = build_method(cfg)
    transform = method.make_transform()
    batch = method.collate([transform(it["image"], torch.Generator().manual_seed(i))
                            for i, it in enumerate(real_xrays(3, size=96))])
    assert batch["global_coords"].shape == (6, 3, 64, 64)
    loss, stats = method.loss(method.student, batch, Progress(step=0, epoch=0, steps_per_epoch=4, total_steps=40))
    assert 0.0 < stats["dense_matched"].item() <= 1.0 and math.isfinite(stats["dense_loss"].item())
    assert loss.item() > stats["dense_loss"].item() * cfg.dense_weight  # the global DINO term on top
    method.student.zero_grad()
    (cfg.dense_weight * method.dense_criterion(  # the dense term alone reaches the dense head and the backbone
        method.student([batch["global"]]).dense, method.teacher([batch["global"]]).dense,
        batch["global_coords"], 0.04)[0]).backward()
    assert method.student.dense_head.mlp[0].weight.grad.abs().sum() > 0
    first = next(p for p in method.student.backbone.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert method.student.head.mlp[0].weight.grad is None  # the global head is not in the dense term
    method.after_backward(Progress(step=0, epoch=0, steps_per_epoch=4, total_steps=40))
    assert method.student.dense_head.last_layer.weight_v.grad is None  # frozen in the first epoch, like DINO's
    before = method.teacher.dense_head.mlp[0].weight.clone()
    with torch.no_grad():
        method.student.dense_head.mlp[0].weight.add_(1.0)
    method.update_teacher(0.9)
    assert torch.allclose(method.teacher.dense_head.mlp[0].weight, before + 0.1, atol=1e-6)


def test_dense_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="dense_weight must be >= 0"):
        PretrainConfig(dense_weight=-1.0).validate()
    with pytest.raises(ConfigError, match="dense_weight applies to method dino"):
        PretrainConfig(method="anatomy", dense_weight=1.0).validate()
    with pytest.raises(ConfigError, match="dense_out_dim"):
        PretrainConfig(dense_out_dim=0).validate()
    with pytest.raises(ConfigError, match="dense_level 4 is out of range for resnet18"):
        build_method(PretrainConfig(arch="resnet18", dense_weight=1.0, dense_level=4))
