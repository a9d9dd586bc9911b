"""Metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from xrayfm.tasks import metrics as M


def test_confusion_and_macro_hand_case() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    scores = np.eye(4)[[0, 1, 1, 1, 0, 2]]  # predictions 0,1,1,1,0,2; class 3 never occurs
    r = M.classification_metrics(y_true, scores)
    assert r["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert r["accuracy"] == pytest.approx(4 / 6)
    # precision: c0 1/2, c1 2/3, c2 1/1 ; recall: c0 1/2, c1 2/2, c2 1/2 ; class 3 excluded
    assert r["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert r["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert r["f1_macro"] == pytest.approx(np.mean(f1))


def test_never_predicted_class_counts_zero_precision() -> None:
    r = M.classification_metrics([0, 1], np.eye(2)[[0, 0]])
    # class 1: never predicted -> precision 0 (defined), recall 0
    assert r["precision_macro"] == pytest.approx((0.5 + 0.0) / 2)
    assert r["recall_macro"] == pytest.approx((1.0 + 0.0) / 2)


def test_top3() -> None:
    scores = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]])
    assert M.top_k_accuracy([0, 2, 1], scores, k=3) == pytest.approx(2 / 3)
    assert M.top_k_accuracy([0, 2, 1], scores, k=1) == pytest.approx(0.0)


def test_balanced_accuracy_counts_only_classes_in_the_truth() -> None:
    # truth 0,0,0,1 ; predictions 0,0,1,2: recall 2/3 (class 0), 0 (class 1); class 2 only predicted
    cm = M.confusion_matrix([0, 0, 0, 1], [0, 0, 1, 2], 4)
    assert M.balanced_accuracy(cm) == pytest.approx((2 / 3 + 0.0) / 2)
    m = M.classification_metrics([0, 0, 0, 1], np.eye(4)[[0, 0, 1, 2]], 4)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0 + 0) / 3)  # counts the predicted-only class
    assert np.isnan(M.balanced_accuracy(np.zeros((3, 3))))


def test_classification_bad_input_messages() -> None:
    with pytest.raises(ValueError, match="class indices"):
        M.confusion_matrix([0, 5], [0, 1], 3)
    with pytest.raises(ValueError, match="one prediction per sample"):
        M.confusion_matrix([0, 1], [0], 3)


def test_dice_iou_hand_and_empty() -> None:
    p = np.zeros((4, 4), bool)
    t = np.zeros((4, 4), bool)
    assert M.dice(p, t) == 1.0 and M.iou(p, t) == 1.0
    p[0, :3] = True  # 3 px
    assert M.dice(p, t) == 0.0 and M.iou(p, t) == 0.0
    t[0, 1:] = True  # 3 px, overlap 2
    assert M.dice(p, t) == pytest.approx(4 / 6)
    assert M.iou(p, t) == pytest.approx(2 / 4)
    r = M.segmentation_metrics([p, np.zeros((4, 4))], [t, np.zeros((4, 4))], boundary_k=None)
    assert r["dice_mean"] == pytest.approx((4 / 6 + 1) / 2)
    assert r["iou_mean"] == pytest.approx((0.5 + 1) / 2)
    assert r["dice_positive_mean"] == pytest.approx(4 / 6) and r["n_positive"] == 1
    assert r["empty_fp_rate"] == 0.0
    nothing = M.segmentation_metrics([np.zeros((4, 4)), np.zeros((4, 4)), p], [t, np.zeros((4, 4)), np.zeros((4, 4))],
                                     boundary_k=None)
    assert nothing["dice_mean"] == pytest.approx(1 / 3)  # predicting nothing still scores the empty image
    assert nothing["dice_positive_mean"] == 0.0 and nothing["empty_fp_rate"] == 0.5
    with pytest.raises(ValueError, match="resize"):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_boundary_band_and_dice() -> None:
    t = np.zeros((9, 9), bool)
    t[2:7, 2:7] = True  # 5x5 square
    band = M.boundary_band(t, 1)
    # k=1: the ring of 16 inner edge pixels + the 4-connected outer ring of 20 pixels
    assert band.sum() == 16 + 20
    assert not band[4, 4] and not band[0, 0]
    assert M.boundary_dice(t, t, 1) == 1.0
    shifted = np.roll(t, 1, axis=1)
    # plain Dice 20/25; inside the band the shift costs relatively more
    assert M.dice(shifted, t) == pytest.approx(0.8)
    assert M.boundary_dice(shifted, t, 1) < 0.8
    assert M.boundary_dice(np.zeros_like(t), np.zeros_like(t)) == 1.0


def _s(head: tuple[float, float], tip: tuple[float, float], score: float = 1.0, **kw: object) -> dict:
    return {"head": list(head), "tip": list(tip), "score": score, **kw}


def test_match_prefers_more_pairs_then_less_distance() -> None:
    trues = [_s((0, 0), (10, 0)), _s((0, 20), (10, 20))]
    # pred A is close to true 0 and within range of true 1; pred B only reaches true 0
    preds = [_s((0, 12), (10, 12)), _s((0, 3), (10, 3))]
    m = M.match_screws(preds, trues, max_dist=9.0)
    assert sorted((p, t) for p, t, _ in m) == [(0, 1), (1, 0)]
    assert sorted(d for *_, d in m) == [3.0, 8.0]


def test_head_tip_are_not_swapped() -> None:
    trues = [_s((0, 0), (20, 0))]
    reversed_pred = [_s((20, 0), (0, 0))]
    assert M.match_screws(reversed_pred, trues, max_dist=10.0) == []


def test_detection_metrics_hand_case() -> None:
    trues = [[_s((10, 10), (30, 10)), _s((50, 50), (50, 80), end_on=True)], []]
    preds = [
        [_s((11, 10), (30, 12), 0.9), _s((50, 51), (50, 80), 0.8), _s((90, 90), (95, 95), 0.7)],
        [_s((5, 5), (9, 9), 0.95)],
    ]
    r = M.detection_metrics(preds, trues, max_dist=5.0, spacings=[0.5, None])
    assert r["n_pred"] == 4 and r["n_true"] == 2 and r["n_matched"] == 2
    assert r["precision"] == pytest.approx(2 / 4)
    assert r["recall"] == pytest.approx(1.0)
    assert r["head_error_px"] == pytest.approx((1.0 + 1.0) / 2)
    assert r["tip_error_px"] == pytest.approx((2.0 + 0.0) / 2)
    assert r["head_error_mm"] == pytest.approx(0.5)
    # only the first screw has an angle (second is end-on): atan2(2, 19) vs 0
    assert r["angle_error_deg"] == pytest.approx(np.degrees(np.arctan2(2, 19)))
    assert r["angle_error_median_deg"] == r["angle_error_deg"] and r["reversed_rate"] == 0.0
    # both truths (20 px and, end-on, 30 px long) were found
    assert r["recall_by_length_px"] == {"0-10": {"n": 0, "recall": None}, "10-20": {"n": 0, "recall": None},
                                        "20-40": {"n": 2, "recall": 1.0}, "40+": {"n": 0, "recall": None}}
    assert r["angle_by_length_px"]["20-40"]["n"] == 1  # the end-on screw has no angle
    # ranking: 0.95 FP, 0.9 TP, 0.8 TP, 0.7 FP -> precision 1/2, 2/3 at recall 0.5, 1.0
    assert r["ap"] == pytest.approx(0.5 * (2 / 3) + 0.5 * (2 / 3))


def test_reversed_short_screw_counts_in_mean_not_median() -> None:
    # three 30 px screws off by 0, 2 and 4 degrees; one 8 px screw predicted head <-> tip
    trues = [[_s((0, 0), (30, 0)), _s((0, 40), (30, 40)), _s((0, 80), (30, 80)), _s((60, 0), (68, 0))]]
    rot = [np.radians(a) for a in (0.0, 2.0, 4.0)]
    preds = [[_s((0, y), (30 * np.cos(a), y + 30 * np.sin(a)), 0.9) for y, a in zip((0, 40, 80), rot)]
             + [_s((68, 0), (60, 0), 0.8)]]
    r = M.detection_metrics(preds, trues, max_dist=10.0)
    assert r["n_matched"] == 4
    assert r["angle_error_deg"] == pytest.approx((0 + 2 + 4 + 180) / 4)
    assert r["angle_error_median_deg"] == pytest.approx(3.0)
    assert r["reversed_rate"] == pytest.approx(0.25)
    # by true length: the reversal is the one short screw, the long ones keep a 2 degree mean
    by_len = r["angle_by_length_px"]
    assert by_len["0-10"] == {"n": 1, "mean_deg": pytest.approx(180.0), "median_deg": pytest.approx(180.0),
                              "reversed_rate": 1.0}
    assert by_len["20-40"]["n"] == 3 and by_len["20-40"]["mean_deg"] == pytest.approx(2.0)
    assert by_len["20-40"]["reversed_rate"] == 0.0
    assert by_len["10-20"] == {"n": 0, "mean_deg": None, "median_deg": None, "reversed_rate": None}


def test_superimposed_screws_are_counted_and_their_recall_reported() -> None:
    # two screws 4 px apart (a lateral view's left and right pedicle screws), a third far away;
    # one prediction lies on the pair and can match only one of them
    trues = [[_s((0, 0), (30, 0)), _s((0, 4), (30, 4)), _s((60, 60), (90, 60))], [_s((0, 0), (30, 0))]]
    preds = [[_s((0, 2), (30, 2), 0.9), _s((60, 61), (90, 61), 0.8)], [_s((0, 0), (30, 0), 0.9)]]
    r = M.detection_metrics(preds, trues)
    assert r["superimposed"] == {"n": 2, "recall": 0.5}
    assert r["recall"] == pytest.approx(3 / 4)
    # 12 px apart: beyond a 10 px matching distance they are two separate screws, within 15 px not
    apart = [[_s((0, 0), (30, 0)), _s((0, 12), (30, 12))]]
    assert M.detection_metrics([[]], apart)["superimposed"] == {"n": 0, "recall": None}
    assert M.detection_metrics([[]], apart, max_dist=15)["superimposed"] == {"n": 2, "recall": 0.0}


def test_score_threshold_sets_operating_point_but_not_ap() -> None:
    trues = [[_s((0, 0), (20, 0)), _s((0, 30), (20, 30))]]
    preds = [[_s((0, 1), (20, 1), 0.9), _s((0, 31), (20, 31), 0.2), _s((50, 50), (60, 60), 0.1)]]
    all_preds = M.detection_metrics(preds, trues)
    op = M.detection_metrics(preds, trues, score_threshold=0.3)
    assert (op["n_pred"], op["n_matched"], op["precision"], op["recall"]) == (1, 1, 1.0, 0.5)
    assert op["recall_by_length_px"]["20-40"] == {"n": 2, "recall": 0.5}
    assert op["missed_near"] == 0 and all_preds["missed_near"] == 0
    # a prediction with the right head but a tip 25 px off misses, yet lies near the truth
    near = M.detection_metrics([[_s((0, 0), (20, 25), 0.9)]], [[_s((0, 0), (20, 0))]])
    assert (near["n_matched"], near["missed_near"]) == (0, 1)
    assert (all_preds["n_pred"], all_preds["precision"], all_preds["recall"]) == (3, 2 / 3, 1.0)
    assert op["ap"] == all_preds["ap"] == pytest.approx(1.0)


def test_detection_empty_cases() -> None:
    r = M.detection_metrics([[]], [[]])
    assert (r["precision"], r["recall"], r["ap"]) == (1.0, 1.0, 1.0)
    assert r["head_error_px"] is None and r["angle_error_deg"] is None
    assert r["angle_error_median_deg"] is None and r["reversed_rate"] is None
    r = M.detection_metrics([[]], [[_s((0, 0), (1, 1))]])
    assert (r["precision"], r["recall"], r["ap"]) == (0.0, 0.0, 0.0)


def test_angle_difference_wraps() -> None:
    assert M.angle_difference(179.0, -179.0) == pytest.approx(2.0)
    assert M.angle_difference(0.0, 180.0) == pytest.approx(180.0)
    assert M.angle_difference(-90.0, 90.0) == pytest.approx(180.0)


def test_f1_operating_point_hand_case() -> None:
    a, b, c = _s((0, 0), (20, 0)), _s((0, 40), (20, 40)), _s((0, 0), (0, 20))
    trues = [[a, b], [c]]
    preds = [[_s((0, 1), (20, 1), 0.9), _s((60, 60), (70, 70), 0.8), _s((1, 40), (20, 41), 0.6)],
             [_s((1, 0), (1, 20), 0.7), _s((50, 50), (55, 55), 0.3)]]
    # ranking TP, FP, TP, TP, FP of 3 truths: F1 0.5, 0.4, 2/3, 6/7, 0.75 -> keep the top 4
    op = M.f1_operating_point(preds, trues, max_dist=5.0)
    assert op == pytest.approx({"threshold": 0.45, "f1": 6 / 7, "precision": 0.75, "recall": 1.0})
    at = M.detection_metrics(preds, trues, max_dist=5.0, score_threshold=op["threshold"])
    assert (at["precision"], at["recall"]) == (0.75, 1.0)
    # at 0.65 the top 3 are kept (TP, FP, TP): P 2/3, R 2/3; above every score F1 is 0
    assert M.f1_operating_point(preds, trues, max_dist=5.0, current=0.65)["f1_at_current"] == pytest.approx(2 / 3)
    assert M.f1_operating_point(preds, trues, max_dist=5.0, current=0.99)["f1_at_current"] == 0.0
    assert M.f1_operating_point([[]], [[a]]) is None and M.f1_operating_point(preds, [[], []]) is None


def test_ignored_truths_count_neither_way() -> None:
    scored, hidden = _s((10, 10), (30, 10)), {**_s((0, 60), (-15, 60)), "ignore": True}
    trues = [[scored, hidden], [{**_s((40, 40), (60, 40)), "ignore": True}]]
    preds = [[_s((10, 11), (30, 11), 0.9), _s((1, 60), (-14, 60), 0.8), _s((70, 70), (80, 80), 0.7)], []]
    r = M.detection_metrics(preds, trues, max_dist=5.0)
    # the prediction on the hidden screw is dropped, the unfound ignored screw is no miss
    assert (r["n_true"], r["n_ignored"], r["n_pred"], r["n_matched"]) == (1, 2, 2, 1)
    assert (r["precision"], r["recall"], r["ap"]) == (0.5, 1.0, 1.0)
    # without the flags the same predictions score P 2/3, R 2/3
    plain = M.detection_metrics(preds, [[scored, {**hidden, "ignore": False}], [_s((40, 40), (60, 40))]], max_dist=5.0)
    assert (plain["precision"], plain["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert M.f1_operating_point(preds, trues, max_dist=5.0)["recall"] == 1.0


def test_ignored_truth_does_not_take_a_prediction_from_a_scored_one() -> None:
    # one prediction, within reach of both: it is the scored screw's, so nothing is dropped
    scored, hidden = _s((0, 0), (20, 0)), {**_s((3, 0), (23, 0)), "ignore": True}
    kept_p, kept_t = M.drop_ignored([[_s((2, 0), (22, 0), 0.9)]], [[scored, hidden]], max_dist=5.0)
    assert kept_t == [[scored]] and len(kept_p[0]) == 1


def test_mean_over_runs_averages_defined_leaves_and_gives_sample_std() -> None:
    hit, miss = M.segmentation_metrics([np.ones((2, 2))], [np.ones((2, 2))], boundary_k=None), \
        M.segmentation_metrics([np.zeros((2, 2))], [np.ones((2, 2))], boundary_k=None)
    mean, std = M.mean_over_runs([hit, miss, hit])
    assert mean["dice_mean"] == pytest.approx(2 / 3) and mean["iou_mean"] == pytest.approx(2 / 3)
    assert std["dice_mean"] == pytest.approx(np.std([1, 0, 1], ddof=1))
    # a screw found in one run and missed in the other: the errors exist in one run only
    true = [[_s((0, 0), (20, 0))]]
    found = M.detection_metrics([[_s((1, 0), (21, 0), 0.9)]], true, max_dist=5.0)
    lost = M.detection_metrics([[]], true, max_dist=5.0)
    mean, std = M.mean_over_runs([found, lost])
    assert (mean["recall"], mean["ap"]) == (0.5, 0.5)
    assert mean["head_error_px"] == found["head_error_px"] == 1.0 and std["head_error_px"] is None
    assert mean["recall_by_length_px"]["20-40"] == {"n": 1.0, "recall": 0.5}
    assert "recall_by_length_px" not in std  # nested leaves get a mean, not a spread
    with pytest.raises(ValueError, match="at least one run"):
        M.mean_over_runs([])
