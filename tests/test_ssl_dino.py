"""DINO pieces: loss against hand-computed values, centre, schedules, EMA, head freezing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from xrayfm.config import ConfigError
from xrayfm.ssl import PretrainConfig, build_method
from xrayfm.ssl.dino import DinoHead, DinoLoss, WeightNormLinear, koleo_loss, sinkhorn_knopp, update_momentum
from xrayfm.ssl.registry import Progress
from xrayfm.ssl.schedules import linear_warmup, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_matches_hand_computation() -> None:
    """Batch 1, 2 global + 1 local crop, 3 prototypes; zero centre."""
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 0.0]]     # student: g0, g1, l0
    t = [[0.2, 0.1, 0.0], [0.0, 0.3, 0.1]]                       # teacher: g0, g1
    ts, tt = 0.1, 0.04
    q = [_softmax([v / tt for v in row]) for row in t]
    logp = [[math.log(p) for p in _softmax([v / ts for v in row])] for row in s]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-sum(qk * lk for qk, lk in zip(q[a], logp[b])) for a, b in pairs) / len(pairs)
    crit = DinoLoss(out_dim=3, n_global=2, student_temp=ts, center_momentum=0.9)
    loss, stats = crit(torch.tensor(s), torch.tensor(t), teacher_temp=tt)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    entropy = sum(-sum(p * math.log(p) for p in row) for row in q) / 2
    assert stats["teacher_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(expected - entropy, rel=1e-5)
    assert stats["kl"].item() >= 0


def test_loss_and_prototypes_stay_fp32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)
    ref, _ = DinoLoss(out_dim=32)(s, t, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = DinoLoss(out_dim=32)(s, t, 0.04)
        out = DinoHead(in_dim=12, out_dim=32, hidden_dim=16, bottleneck_dim=8)(torch.randn(5, 12))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=1e-6)
    assert out.dtype == torch.float32


def test_centre_is_an_ema_of_the_teacher_batch_mean() -> None:
    crit = DinoLoss(out_dim=4, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    crit(torch.zeros(2, 4), t1, 0.04)
    assert torch.allclose(crit.center, 0.1 * t1.mean(0, keepdim=True))
    t2 = torch.full((2, 4), 10.0)
    crit(torch.zeros(2, 4), t2, 0.04)
    assert torch.allclose(crit.center, 0.9 * 0.1 * t1.mean(0, keepdim=True) + 0.1 * 10.0)


def test_centering_changes_the_teacher_targets() -> None:
    crit = DinoLoss(out_dim=3)
    s = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])
    before, _ = crit(s, t, 0.04)
    crit.center.copy_(torch.tensor([[5.0, 0.0, 0.0]]))
    after, stats = crit(s, t, 0.04)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(3), rel=1e-5)
    assert before.item() != pytest.approx(after.item())


def test_teacher_temperature_warmup() -> None:
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == linear_warmup(99, 30, 0.04, 0.07) == pytest.approx(0.07)
    cfg = PretrainConfig(arch="vit_tiny_patch16", global_size=32, local_size=16, out_dim=16, hidden_dim=16,
                         bottleneck_dim=8, warmup_teacher_temp=0.04, teacher_temp=0.07,
                         warmup_teacher_temp_epochs=2)
    method = build_method(cfg)
    assert method.teacher_temp(Progress(0, 0, 10, 100)) == pytest.approx(0.04)
    assert method.teacher_temp(Progress(10, 1, 10, 100)) == pytest.approx(0.055)
    assert method.teacher_temp(Progress(50, 5, 10, 100)) == pytest.approx(0.07)


def test_cosine_schedule_endpoints_and_warmup() -> None:
    assert warmup_cosine(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(99, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert warmup_cosine(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    mid = warmup_cosine(10 + 89 // 2, 100, 1.0, 0.0, warmup_steps=10)
    assert 0.45 < mid < 0.55
    assert warmup_cosine(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert warmup_cosine(99, 100, 0.996, 1.0) == pytest.approx(1.0)
    values = [warmup_cosine(s, 50, 0.04, 0.4) for s in range(50)]
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_ema_update_math() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.clone() for p in teacher.parameters()]
    update_momentum(student, teacher, 0.9)
    for tp, t_old, sp in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(tp, 0.9 * t_old + 0.1 * sp, atol=1e-7)
    update_momentum(student, teacher, 1.0)
    for tp, t_new in zip(teacher.parameters(), [p.clone() for p in teacher.parameters()]):
        assert torch.equal(tp, t_new)


def test_head_shapes_and_unit_norm_prototypes() -> None:
    head = DinoHead(in_dim=12, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 32)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine similarities: unit bottleneck x unit prototypes
    layer = WeightNormLinear(8, 4)
    assert not layer.weight_g.requires_grad


def test_last_layer_frozen_in_first_epoch_only() -> None:
    cfg = PretrainConfig(arch="vit_tiny_patch16", global_size=32, local_size=16, n_local=1, out_dim=16,
                         hidden_dim=16, bottleneck_dim=8, freeze_last_layer_epochs=1)
    method = build_method(cfg)
    batch = {"global": torch.rand(4, 1, 32, 32), "local": torch.rand(2, 1, 16, 16)}
    for step, frozen in ((3, True), (10, False)):
        progress = Progress(step, step // 10, 10, 100)
        method.student.zero_grad(set_to_none=True)
        loss, _ = method.loss(method.student, batch, progress)
        loss.backward()
        method.after_backward(progress)
        grad = method.student.head.last_layer.weight_v.grad
        assert (grad is None) == frozen
        assert method.student.head.mlp[0].weight.grad is not None


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="precision"):
        PretrainConfig(precision="fp8").validate()
    with pytest.raises(ConfigError, match="local_scale"):
        PretrainConfig(local_scale=(0.5, 0.1)).validate()
    with pytest.raises(ConfigError, match="unknown method"):
        build_method(PretrainConfig(method="simclr"))


def _sinkhorn_reference(scores: list[list[float]], temp: float, iterations: int) -> list[list[float]]:
    """Plain-Python Sinkhorn-Knopp: prototypes get mass 1/K, samples 1/B, rows returned summing to 1."""
    b, k = len(scores), len(scores[0])
    q = [[math.exp(v / temp) for v in row] for row in scores]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        col = [sum(q[i][j] for i in range(b)) for j in range(k)]
        q = [[q[i][j] / col[j] / k for j in range(k)] for i in range(b)]
        q = [[v / sum(row) / b for v in row] for row in q]
    return [[v * b for v in row] for row in q]


def test_sinkhorn_targets_match_the_reference_equations() -> None:
    scores = [[0.3, 0.1, -0.2, 0.0], [0.25, 0.1, -0.1, 0.05], [0.3, 0.0, -0.2, 0.1]]
    got = sinkhorn_knopp(torch.tensor(scores), temp=0.1, iterations=3)
    assert torch.allclose(got, torch.tensor(_sinkhorn_reference(scores, 0.1, 3)), atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(3), atol=1e-6)
    # every row prefers prototype 0 before balancing; after it, prototype use is near-equal
    assert got.mean(0).max() - got.mean(0).min() < 0.05
    crit = DinoLoss(out_dim=4, n_global=1, centering="sinkhorn")
    student = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    loss, _ = crit(torch.cat([student, student]), torch.tensor(scores), 0.1)
    logp = torch.log_softmax(student / 0.1, dim=-1)
    assert loss.item() == pytest.approx(-(got * logp).sum(1).mean().item(), rel=1e-5)
    assert torch.equal(crit.center, torch.zeros(1, 4))  # no EMA centre in this mode
    with pytest.raises(ValueError, match="centering"):
        DinoLoss(out_dim=4, centering="mean")


def test_koleo_matches_hand_computation() -> None:
    # three unit vectors: nearest-neighbour distances sqrt(2 - 2 cos)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = [math.sqrt(2.0), math.sqrt(2.0), math.sqrt(2.0)]
    assert koleo_loss(x).item() == pytest.approx(-sum(math.log(v) for v in d) / 3, rel=1e-5)
    close = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    assert koleo_loss(close).item() > koleo_loss(x).item()  # crowded features cost more


def test_head_batch_norm_and_koleo_train_through_the_method() -> None:
    cfg = PretrainConfig(arch="resnet18", global_size=32, local_size=16, n_local=1, out_dim=16, hidden_dim=16,
                         bottleneck_dim=8, head_bn=True, koleo_weight=0.1, precision="fp32")
    method = build_method(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in method.student.head.mlp)
    g = torch.Generator().manual_seed(0)
    batch = {"global": torch.rand(2 * 3, 1, 32, 32, generator=g), "local": torch.rand(3, 1, 16, 16, generator=g)}
    loss, stats = method.loss(method.student, batch, Progress(step=10, epoch=2, steps_per_epoch=4, total_steps=40))
    loss.backward()
    assert math.isfinite(loss.item()) and "koleo" in stats
    assert method.student.backbone.model.conv1.weight.grad is not None
    with pytest.raises(ConfigError, match="optimizer"):
        PretrainConfig(optimizer="lamb").validate()
