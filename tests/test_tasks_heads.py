"""Head shapes on real backbones, the head registry, and exact screw encoding/decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrayfm.models.backbones import create_backbone
from xrayfm.models.heads import DETECTION_CHANNELS, create_head, head_info, head_reads_image, list_heads
from xrayfm.tasks.base import get_task
from xrayfm.tasks.data import LabeledImage
from xrayfm.tasks.detect import decode_screws, encode_screws, truths
from xrayfm.tasks.metrics import detection_metrics, superimposed_screws

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["vit_tiny_patch16", "resnet18"]


@pytest.fixture(scope="module")
def backbones() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {a: create_backbone(a, img_size=64).eval() for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_head_output_shapes(arch: str, backbones: dict) -> None:
    bb = backbones[arch]
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        pooled, dense = bb(x), bb.forward_dense(x)
    for name in ("linear", "mlp"):
        head = create_head(name, bb.embed_dim, bb.dense_channels, bb.dense_strides, num_classes=11)
        assert head(pooled).shape == (2, 11)
    seg = create_head("seg_decoder", bb.embed_dim, bb.dense_channels, bb.dense_strides)
    assert seg(dense, size=(64, 96)).shape == (2, 1, 64, 96)
    det = create_head("screw_keypoints", bb.embed_dim, bb.dense_channels, bb.dense_strides, superimposed=True)
    assert det(dense).shape == (2, len(DETECTION_CHANNELS), 16, 24)
    det2 = create_head("screw_keypoints", bb.embed_dim, bb.dense_channels, bb.dense_strides, out_stride=2)
    # without the superimposed heatmap (bundles from before it): the first 11 channels
    assert det2.stride == 2 and det2(dense).shape == (2, len(DETECTION_CHANNELS) - 1, 32, 48)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stride", [4, 2, 1])
def test_image_skip_heads(arch: str, stride: int, backbones: dict) -> None:
    """``image_skip``: the normalised input follows the maps; the output depends on its pixels."""
    bb = backbones[arch]
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        dense = list(bb.forward_dense(x))
    image = bb.normalise(x)
    seg = create_head("seg_decoder", bb.embed_dim, bb.dense_channels, bb.dense_strides, out_stride=stride,
                      image_skip=True).eval()
    assert head_reads_image(seg) and not head_reads_image(create_head("seg_decoder", bb.embed_dim,
                                                                      bb.dense_channels, bb.dense_strides))
    with torch.no_grad():
        y = seg([*dense, image], size=(64, 96))
        y_other = seg([*dense, image.flip(-1)], size=(64, 96))
    assert y.shape == (2, 1, 64, 96) and not torch.allclose(y, y_other)
    det = create_head("screw_keypoints", bb.embed_dim, bb.dense_channels, bb.dense_strides, out_stride=stride,
                      image_skip=True, superimposed=True)
    assert det([*dense, image]).shape == (2, len(DETECTION_CHANNELS), 64 // stride, 96 // stride)
    with pytest.raises(ValueError, match="plus the input image"):
        det(dense)


def test_registry() -> None:
    assert {"linear", "mlp"} <= set(list_heads("classify"))
    assert list_heads("segment") == ["seg_decoder"] and list_heads("detect") == ["screw_keypoints"]
    assert head_info("seg_decoder") == ("segment", "dense")
    with pytest.raises(ValueError, match="choose one of"):
        create_head("nope", 8, [8], [16])


def _logits_from_targets(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets as the head's perfect output: head/tip heatmaps, regressions, superimposed heatmap."""
    heat = torch.logit(t["heat"].clamp(1e-6, 1 - 1e-6))
    return torch.cat([heat[:2], t["reg"], heat[2:]])[None]


def test_stride2_grid_separates_ends_that_share_a_stride4_cell() -> None:
    # two parallel screws 2.4 px apart: heads share stride-4 cell (7, 7), tips cell (5, 15), not a
    # stride-2 cell. At stride 4 the later label wins both cells and one screw is lost, at stride 2
    # both come back exactly
    screws = [{"head": [28.5, 29.0], "tip": [60.0, 20.0]}, {"head": [30.9, 29.5], "tip": [62.1, 20.8]}]
    assert len(decode_screws(_logits_from_targets(encode_screws(screws, 64, 64)), threshold=0.5)[0]) == 1
    out = _logits_from_targets(encode_screws(screws, 64, 64, stride=2))
    assert out.shape[-2:] == (32, 32)
    task = get_task("detect")
    got = task.predict(out, [LabeledImage(np.zeros((64, 64), np.float32), "a")], (64, 64))[0]
    got = [g for g in got if g["score"] >= 0.5]  # predict decodes down to the AP floor
    assert len(got) == 2
    for s, g in zip(sorted(screws, key=lambda s: s["head"]), sorted(got, key=lambda g: g["head"])):
        np.testing.assert_allclose(g["head"], s["head"], atol=1e-4)
        np.testing.assert_allclose(g["tip"], s["tip"], atol=1e-4)
    with pytest.raises(ValueError, match="does not divide the input size"):
        task.predict(out, [LabeledImage(np.zeros((64, 64), np.float32), "a")], (60, 60))


def test_superimposed_screws_get_their_own_heatmap_and_a_copy() -> None:
    # the same two screws 2.4 px apart plus one far away: the superimposed heatmap peaks at the
    # pair's shared head cell only, and decoding it returns the pair as two screws
    screws = [{"head": [28.5, 29.0], "tip": [60.0, 20.0]}, {"head": [30.9, 29.5], "tip": [62.1, 20.8]},
              {"head": [8.0, 50.0], "tip": [30.0, 58.0]}]
    assert superimposed_screws(screws, 10.0) == [True, True, False]
    t = encode_screws(screws, 64, 64, superimposed=True)
    assert t["heat"].shape == (3, 16, 16) and t["heat"][2].eq(1.0).nonzero().tolist() == [[7, 7]]
    got = decode_screws(_logits_from_targets(t), threshold=0.5)[0]
    assert len(got) == 3 and all(g["score"] == pytest.approx(1.0, abs=1e-5) for g in got)
    assert sum(bool(g.get("superimposed")) for g in got) == 1
    m = detection_metrics([got], [screws], max_dist=3.0)
    assert (m["recall"], m["precision"], m["superimposed"]) == (1.0, 1.0, {"n": 2, "recall": 1.0})
    # at stride 2 the two have peaks of their own: no copy on top of them
    t2 = encode_screws(screws, 64, 64, stride=2, superimposed=True)
    assert t2["heat"][2].eq(1.0).sum() == 2
    assert len(decode_screws(_logits_from_targets(t2), threshold=0.5, stride=2)[0]) == 3
    # a weak superimposed response: the copy scores it and the threshold decides
    t["heat"][2] *= 0.4
    low = decode_screws(_logits_from_targets(t), threshold=0.3)[0]
    assert sorted(round(g["score"], 4) for g in low) == [0.4, 1.0, 1.0]
    assert len(decode_screws(_logits_from_targets(t), threshold=0.5)[0]) == 2


def test_decode_recovers_ground_truth_exactly() -> None:
    screws = [
        # two screws crossing at the same midpoint (48, 48), one pointing each way
        {"head": [30.3, 30.9], "tip": [65.7, 65.1]},
        {"head": [66.2, 29.4], "tip": [29.8, 66.6]},
        # a short near end-on screw with head and tip in one stride cell
        {"head": [80.6, 12.2], "tip": [81.4, 13.1]},
        # a screw near the border
        {"head": [2.5, 90.0], "tip": [40.0, 93.5]},
    ]
    for s in screws:
        lo, hi = np.minimum(s["head"], s["tip"]) - 2.0, np.maximum(s["head"], s["tip"]) + 2.0
        s["box"] = [*lo, *hi]
    targets = encode_screws(screws, 96, 96)
    got = decode_screws(_logits_from_targets(targets), threshold=0.5)[0]
    assert len(got) == len(screws)
    for s in screws:
        best = min(got, key=lambda g: np.hypot(*np.subtract(g["head"], s["head"])))
        np.testing.assert_allclose(best["head"], s["head"], atol=1e-4)
        np.testing.assert_allclose(best["tip"], s["tip"], atol=1e-4)
        np.testing.assert_allclose(best["box"], s["box"], atol=1e-4)
        d = np.subtract(s["tip"], s["head"])
        assert best["angle_deg"] == pytest.approx(np.degrees(np.arctan2(d[1], d[0])), abs=1e-3)
        assert best["score"] == pytest.approx(1.0, abs=1e-5)


def test_hidden_ends_get_no_peak_but_the_visible_end_points_at_them() -> None:
    screws = [{"head": [20.0, 20.0], "tip": [50.0, 30.0], "tip_visible": False},  # tip behind a blade
              {"head": [40.0, 60.0], "tip": [70.0, 60.0]}]                        # tip outside the 64 px image
    t = encode_screws(screws, 64, 64)
    assert t["heat"][0].eq(1.0).sum() == 2 and t["heat"][1].eq(1.0).sum() == 0
    assert t["reg_mask"][2:4].sum() == 0  # no tip cell regresses anything
    # each head still carries the vector to its hidden tip
    np.testing.assert_allclose(t["reg"][4:6, 5, 5], [30 / 4, 10 / 4])
    np.testing.assert_allclose(t["reg"][4:6, 15, 10], [30 / 4, 0.0])


def test_truths_ignore_screws_with_a_hidden_end() -> None:
    item = LabeledImage(image=np.zeros((64, 80), np.float32), image_id="a", screws=[
        {"head": [10.0, 10.0], "tip": [75.0, 10.0]},                      # x < width 80: inside
        {"head": [10.0, 40.0], "tip": [10.0, 70.0]},                      # y >= height 64
        {"head": [5.0, 5.0], "tip": [20.0, 20.0], "head_visible": False}])
    assert [s["ignore"] for s in truths([item])[0]] == [False, True, True]


def test_decode_empty_and_unpaired_head() -> None:
    assert decode_screws(_logits_from_targets(encode_screws([], 64, 64)))[0] == []
    t = encode_screws([{"head": [10.0, 10.0], "tip": [50.0, 40.0]}], 64, 64)
    t["heat"][1] = 0.0  # the tip peak is missing: the head alone yields no confident screw
    assert decode_screws(_logits_from_targets(t), threshold=0.3)[0] == []
    # a tip response below the candidate floor where the head says its tip is: no tip candidate,
    # but the unpaired head keeps its predicted tip with score 1.0 ** 0.85 * 0.25 ** 0.15
    t["heat"][1, 10, 12] = 0.25
    got = decode_screws(_logits_from_targets(t), threshold=0.3, candidates=0.3)[0]
    assert len(got) == 1
    np.testing.assert_allclose(got[0]["tip"], [50.0, 40.0], atol=1e-4)
    assert got[0]["score"] == pytest.approx(0.25**0.15, abs=1e-4)
    assert decode_screws(_logits_from_targets(t), threshold=0.3, candidates=0.3,
                         partner_weight=0.5)[0][0]["score"] == pytest.approx(0.5, abs=1e-4)


def test_decoded_screw_does_not_depend_on_the_threshold() -> None:
    t = encode_screws([{"head": [10.0, 10.0], "tip": [50.0, 42.0]}], 64, 64)
    t["heat"][0] *= 0.9
    t["heat"][1] *= 0.2            # a weak tip peak (0.2) under the 0.3 operating point
    t["reg"][4:6, 2, 2] += 0.25   # and the head points 1 px beside its tip
    logits = _logits_from_targets(t)
    low = decode_screws(logits, threshold=0.05)[0]
    at = decode_screws(logits, threshold=0.3)[0]
    assert at == [s for s in low if s["score"] >= 0.3] and len(at) == 1
    # the weak tip still pairs with the head (score sqrt(0.9 * 0.2)), so the tip is its own exact point
    np.testing.assert_allclose(at[0]["tip"], [50.0, 42.0], atol=1e-4)
    assert at[0]["score"] == pytest.approx(np.sqrt(0.18), abs=1e-4)
    # peaks under ``candidates`` do not pair: the head alone keeps the tip it predicts
    alone = decode_screws(logits, threshold=0.3, candidates=0.3)[0]
    np.testing.assert_allclose(alone[0]["tip"], [51.0, 43.0], atol=1e-4)
