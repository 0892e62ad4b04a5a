"""Tests for lcfed.runtime.metrics against values derived by hand on small constructed masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lcfed.runtime.metrics import (
    METRIC_NAMES,
    binarize,
    case_metrics,
    evaluate_site,
    largest_component,
    mean_over_sites,
    mean_per_class,
    regroup_cases,
)


def _empty(*shape: int) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def _shifted_squares() -> tuple[np.ndarray, np.ndarray]:
    """4x4 square and the same square shifted down by one row, in a 10x10 image (C=1)."""
    pred, label = _empty(1, 10, 10), _empty(1, 10, 10)
    pred[0, 2:6, 2:6] = True
    label[0, 3:7, 2:6] = True
    return pred, label


# --------------------------------------------------------------------------------------- binarize


def test_binarize_threshold_is_inclusive():
    prob = np.array([0.0, 0.49, 0.4999, 0.5, 0.51, 1.0])
    np.testing.assert_array_equal(binarize(prob), [False, False, False, True, True, True])
    np.testing.assert_array_equal(binarize(prob, threshold=0.51), [False, False, False, False, True, True])
    assert binarize(prob).dtype == bool


# ------------------------------------------------------------------------------------ Dice / IoU


def test_dice_iou_of_shifted_squares():
    pred, label = _shifted_squares()
    # |P| = |L| = 16, |P & L| = 12 (rows 3..5), |P | L| = 20
    m = case_metrics(pred, label)
    assert m["dice"] == pytest.approx(2 * 12 / (16 + 16))  # 0.75
    assert m["iou"] == pytest.approx(12 / 20)  # 0.6
    assert all(isinstance(m[k], float) for k in METRIC_NAMES)


def test_shifted_squares_surface_distances():
    pred, label = _shifted_squares()
    # Edges = mask minus its erosion = the 12-pixel ring of each square. Pred ring: its top row (4 px) is
    # 1 from the gt top row; its side pixels on rows 3..5 lie on the gt ring (0), except the two bottom
    # middle ones (5,3),(5,4), which are 1 away. So 6 of 12 distances are 1, 6 are 0; symmetric by
    # construction. 95th percentile = 1; mean = 0.5.
    m = case_metrics(pred, label)
    assert m["hd95"] == pytest.approx(1.0)
    assert m["assd"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ HD95 / ASSD


@pytest.mark.parametrize(
    ("offset", "expected"),
    [((3, 0), 3.0), ((0, 3), 3.0), ((3, 4), 5.0)],
)
def test_single_pixel_shift(offset, expected):
    pred, label = _empty(1, 12, 12), _empty(1, 12, 12)
    pred[0, 2, 2] = True
    label[0, 2 + offset[0], 2 + offset[1]] = True
    m = case_metrics(pred, label)
    assert m["hd95"] == pytest.approx(expected)
    assert m["assd"] == pytest.approx(expected)
    assert m["dice"] == 0.0 and m["iou"] == 0.0


def test_anisotropic_spacing_2d():
    pred, label = _empty(1, 12, 12), _empty(1, 12, 12)
    pred[0, 2, 2] = True
    label[0, 5, 2] = True  # 3 pixels along axis 0
    assert case_metrics(pred, label, spacing=(2.0, 1.0))["hd95"] == pytest.approx(6.0)
    assert case_metrics(pred, label, spacing=(1.0, 2.0))["hd95"] == pytest.approx(3.0)
    label2 = _empty(1, 12, 12)
    label2[0, 2, 6] = True  # 4 pixels along axis 1
    m = case_metrics(pred, label2, spacing=(2.0, 0.5))
    assert m["hd95"] == pytest.approx(2.0) and m["assd"] == pytest.approx(2.0)


def test_anisotropic_spacing_3d_across_slices():
    pred, label = _empty(1, 6, 6, 5), _empty(1, 6, 6, 5)
    pred[0, 2, 2, 1] = True
    label[0, 2, 2, 3] = True  # 2 slices apart
    m = case_metrics(pred, label, spacing=(0.5, 0.5, 2.5))
    assert m["hd95"] == pytest.approx(5.0) and m["assd"] == pytest.approx(5.0)
    label[0, 2, 2, 3] = False
    label[0, 5, 2, 1] = True  # 3 rows apart in-plane, same slice: 3 * 0.5
    assert case_metrics(pred, label, spacing=(0.5, 0.5, 2.5))["hd95"] == pytest.approx(1.5)


def test_concentric_squares():
    pred, label = _empty(1, 11, 11), _empty(1, 11, 11)
    label[0, 2:9, 2:9] = True  # 7x7, edge = 24-pixel ring at offsets |dy|=3 or |dx|=3 from the centre
    pred[0, 4:7, 4:7] = True  # 3x3, edge = the 8 pixels around the centre
    # pred -> gt: every inner-ring pixel is 2 from the outer ring (8 x 2).
    # gt -> pred: outer pixel (3, y) is sqrt(4 + (|y|-1)_+^2) from the inner ring:
    #   |y| <= 1: 2 (12 pixels), |y| = 2: sqrt(5) (8 pixels), corners: sqrt(8) (4 pixels).
    # 95th percentile of those 24 sorted values: position 0.95 * 23 = 21.85, among the 4 corners -> sqrt(8).
    m = case_metrics(pred, label)
    assert m["hd95"] == pytest.approx(math.sqrt(8), rel=1e-5)
    assert m["assd"] == pytest.approx((8 * 2 + 12 * 2 + 8 * math.sqrt(5) + 4 * math.sqrt(8)) / 32, rel=1e-5)
    assert m["dice"] == pytest.approx(2 * 9 / (9 + 49))
    assert m["iou"] == pytest.approx(9 / 49)
    # with spacing 0.5 everywhere all distances halve
    m_half = case_metrics(pred, label, spacing=(0.5, 0.5))
    assert m_half["hd95"] == pytest.approx(math.sqrt(8) / 2, rel=1e-5)
    assert m_half["assd"] == pytest.approx(m["assd"] / 2, rel=1e-5)
    assert case_metrics(pred, label, spacing=0.5)["hd95"] == pytest.approx(m_half["hd95"])  # scalar = isotropic


def test_hd95_ignores_a_single_outlier_but_assd_does_not():
    pred, label = _empty(1, 40, 40), _empty(1, 40, 40)
    pred[0, 2:22, 2:22] = True  # 20x20 square, edge ring of 4 * 20 - 4 = 76 pixels
    label[0, 2:22, 2:22] = True
    label[0, 22 + 10, 2] = True  # one isolated gt pixel 11 rows below the square's last row (row 21)
    # pred -> gt: 76 zeros. gt -> pred: 76 zeros and one 11.
    # 95th percentile of 77 values with a single non-zero: position 72.2 among the zeros -> 0.
    m = case_metrics(pred, label)
    assert m["hd95"] == pytest.approx(0.0)
    assert m["assd"] == pytest.approx(11 / (76 + 77), rel=1e-5)


def test_single_slice_case_measured_on_its_2d_contour():
    pred, label = _empty(1, 11, 11), _empty(1, 11, 11)
    label[0, 2:9, 2:9] = True
    pred[0, 4:7, 4:7] = True
    m2 = case_metrics(pred, label)
    m3 = case_metrics(pred[..., None], label[..., None], spacing=(1.0, 1.0, 3.0))
    for k in METRIC_NAMES:
        assert m3[k] == pytest.approx(m2[k], rel=1e-6)


# ------------------------------------------------------------------------------------ empty masks


def test_both_empty_is_perfect():
    m = case_metrics(_empty(2, 8, 8, 3), _empty(2, 8, 8, 3))
    assert (m["dice"], m["iou"], m["hd95"], m["assd"]) == (1.0, 1.0, 0.0, 0.0)
    assert m["per_class"]["dice"] == [1.0, 1.0]


@pytest.mark.parametrize("empty_side", ["pred", "label"])
def test_one_empty_is_worst_case_diagonal(empty_side):
    full = _empty(1, 6, 8)
    full[0, 1:3, 1:3] = True
    pred, label = (_empty(1, 6, 8), full) if empty_side == "pred" else (full, _empty(1, 6, 8))
    m = case_metrics(pred, label)
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd95"] == pytest.approx(10.0) and m["assd"] == pytest.approx(10.0)  # sqrt(6^2 + 8^2)
    m_sp = case_metrics(pred, label, spacing=(2.0, 0.5))
    assert m_sp["hd95"] == pytest.approx(math.sqrt(12**2 + 4**2))
    # 3-D: diagonal over all spatial axes, in physical units
    vol = _empty(1, 3, 4, 6)
    vol[0, 1, 1, 1] = True
    m3 = case_metrics(vol, _empty(1, 3, 4, 6), spacing=(1.0, 1.0, 2.0))
    assert m3["hd95"] == pytest.approx(13.0) and m3["assd"] == pytest.approx(13.0)  # sqrt(9 + 16 + 144)


def test_no_nan_when_classes_mix_empty_and_present():
    pred, label = _empty(3, 10, 10, 2), _empty(3, 10, 10, 2)
    pred[0, 2:5, 2:5, :] = True  # class 0: gt empty
    label[1, 2:5, 2:5, :] = True  # class 1: pred empty
    # class 2: both empty
    m = case_metrics(pred, label)
    diag = math.sqrt(10**2 + 10**2 + 2**2)
    assert m["per_class"]["dice"] == [0.0, 0.0, 1.0]
    assert m["per_class"]["hd95"] == pytest.approx([diag, diag, 0.0])
    assert m["hd95"] == pytest.approx(2 * diag / 3)
    assert not any(math.isnan(v) for k in METRIC_NAMES for v in m["per_class"][k])


# ------------------------------------------------------------------------------------ multi-class


def test_multi_class_mean_over_classes():
    p0, l0 = _shifted_squares()  # dice 0.75, iou 0.6, hd95 1, assd 0.5 (see above)
    p1 = _empty(1, 10, 10)
    p1[0, 1:4, 5:9] = True
    pred = np.concatenate([p0, p1])
    label = np.concatenate([l0, p1])  # class 1 identical: dice 1, iou 1, hd95 0, assd 0
    m = case_metrics(pred, label)
    assert m["per_class"]["dice"] == pytest.approx([0.75, 1.0])
    assert m["dice"] == pytest.approx(0.875)
    assert m["iou"] == pytest.approx((0.6 + 1.0) / 2)
    assert m["hd95"] == pytest.approx(0.5)
    assert m["assd"] == pytest.approx(0.25)
    assert set(m["per_class"]) == set(METRIC_NAMES)


def test_case_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        case_metrics(_empty(1, 4, 4), _empty(1, 4, 5))
    with pytest.raises(ValueError):
        case_metrics(_empty(1, 4, 4), _empty(1, 4, 4), spacing=(1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------ largest component


def test_largest_component_per_channel_independent():
    mask = _empty(3, 10, 10)
    mask[0, 0:3, 0:3] = True  # big blob (9)
    mask[0, 6:8, 6:8] = True  # small blob (4)
    mask[1, 6:8, 6:8] = True  # channel 1 overlaps ch 0's small blob; it is ch 1's largest (4 vs 1)
    mask[1, 0, 9] = True
    # channel 2 empty
    out = largest_component(mask)
    expected = _empty(3, 10, 10)
    expected[0, 0:3, 0:3] = True
    expected[1, 6:8, 6:8] = True
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == bool
    np.testing.assert_array_equal(mask[0, 6:8, 6:8], True)  # input untouched


def test_largest_component_full_connectivity_2d():
    mask = _empty(1, 8, 8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = True  # diagonal chain: one component of 3
    mask[0, 6, 5:7] = True  # 2 pixels
    out = largest_component(mask)
    expected = _empty(1, 8, 8)
    expected[0, 0, 0] = expected[0, 1, 1] = expected[0, 2, 2] = True
    np.testing.assert_array_equal(out, expected)


def test_largest_component_is_3d_across_slices():
    vol = _empty(1, 8, 8, 2)
    vol[0, 0:2, 0:2, 0] = True  # X: 4 px on slice 0 ...
    vol[0, 0:2, 0:2, 1] = True  # ... and 4 px on slice 1: 8 px in 3-D
    vol[0, 5:8, 5:7, 1] = True  # Y: 6 px, larger than X on slice 1 alone
    out = largest_component(vol)
    expected = _empty(1, 8, 8, 2)
    expected[0, 0:2, 0:2, :] = True
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------------------------- regrouping


def _slice(value: float, c: int = 2, h: int = 3, w: int = 4) -> np.ndarray:
    return np.full((c, h, w), value, dtype=float)


def test_regroup_orders_slices_and_stacks_last():
    ids = ["b", "a", "a", "b", "a", "c"]
    sl = [7, 2, 0, 3, 1, 5]
    preds = [_slice(10 * ord(i) + s) for i, s in zip(ids, sl)]
    labels = [-p for p in preds]
    out = regroup_cases(ids, sl, preds, labels)
    assert list(out) == ["b", "a", "c"]  # order of first appearance
    pa, la = out["a"]
    assert pa.shape == (2, 3, 4, 3) and la.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(pa[0, 0, 0, :], [10 * ord("a") + s for s in (0, 1, 2)])
    np.testing.assert_array_equal(la, -pa)
    pb, _ = out["b"]
    np.testing.assert_array_equal(pb[1, 2, 3, :], [10 * ord("b") + 3, 10 * ord("b") + 7])
    pc, lc = out["c"]
    assert pc.shape == (2, 3, 4, 1) and lc.shape == (2, 3, 4, 1)


def test_regroup_errors():
    with pytest.raises(ValueError, match="duplicated"):
        regroup_cases(["a", "a"], [0, 0], [_slice(0), _slice(1)], [_slice(0), _slice(1)])
    with pytest.raises(ValueError):
        regroup_cases(["a", "a"], [0, 1], [_slice(0), _slice(1, h=5)], [_slice(0), _slice(1, h=5)])
    with pytest.raises(ValueError):
        regroup_cases(["a"], [0], [_slice(0)], [_slice(0, c=1)])
    with pytest.raises(ValueError):
        regroup_cases(["a", "b"], [0], [_slice(0)], [_slice(0)])
    # same slice index in different cases is fine, and different shapes across cases too
    out = regroup_cases(["a", "b"], [0, 0], [_slice(0), _slice(1, h=5)], [_slice(0), _slice(1, h=5)])
    assert out["b"][0].shape == (2, 5, 4, 1)


def test_3d_dice_differs_from_mean_of_slice_dice():
    lab0, pred0 = _empty(1, 6, 6), _empty(1, 6, 6)
    lab0[0, 0:2, 0:2] = pred0[0, 0:2, 0:2] = True  # 4 px, identical: slice Dice 1
    lab1, pred1 = _empty(1, 6, 6), _empty(1, 6, 6)
    lab1[0, 0:4, 0:4] = True  # 16 px
    pred1[0, 0:2, 0:4] = True  # 8 px inside: slice Dice 2*8/24 = 2/3
    per_slice = [case_metrics(pred0, lab0)["dice"], case_metrics(pred1, lab1)["dice"]]
    assert per_slice == pytest.approx([1.0, 2 / 3])
    mean_slice = (1.0 + 2 / 3) / 2  # 5/6
    (pred, label) = regroup_cases(["p", "p"], [1, 0], [pred1, pred0], [lab1, lab0])["p"]
    dice_3d = case_metrics(pred, label)["dice"]
    # 3-D: |P & L| = 4 + 8 = 12, |P| = 12, |L| = 20 -> 24/32
    assert dice_3d == pytest.approx(0.75)
    assert dice_3d != pytest.approx(mean_slice)


# --------------------------------------------------------------------------- site / federation


def _tiny_site():
    lab = np.zeros((1, 8, 8))
    lab[0, 1:3, 1:3] = 1.0  # 2x2 square
    prob = np.full((1, 8, 8), 0.1)
    prob[0, 1:3, 1:3] = 0.9
    prob[0, 6, 6] = 0.5  # spurious pixel, counts as foreground (>= 0.5)
    prob[0, 6, 0] = 0.49  # below threshold
    perfect = lab * 0.8
    ids = ["p2", "p1", "p2"]
    sl = [1, 0, 0]
    return ids, sl, [perfect, prob, perfect], [lab, lab, lab]


def test_evaluate_site_without_lcc():
    ids, sl, probs, labels = _tiny_site()
    res = evaluate_site(ids, sl, probs, labels, largest_cc=False)
    assert res["n_cases"] == 2 and set(res["cases"]) == {"p1", "p2"}
    p1 = res["cases"]["p1"]
    # p1: pred = square (4) + spurious pixel, |P & L| = 4 -> Dice 8/9, IoU 4/5.
    # Edges: gt ring = the 4 square pixels; pred = those 4 + the pixel (6,6), sqrt(4^2 + 4^2) = sqrt(32)
    # from the nearest gt pixel (2,2). Distances pred->gt [0,0,0,0,sqrt32], gt->pred [0,0,0,0].
    # HD95 = 95th percentile of the first: position 3.8 -> 0.8 * sqrt(32). ASSD = sqrt(32) / 9.
    assert p1["dice"] == pytest.approx(8 / 9)
    assert p1["iou"] == pytest.approx(4 / 5)
    assert p1["hd95"] == pytest.approx(0.8 * math.sqrt(32), rel=1e-5)
    assert p1["assd"] == pytest.approx(math.sqrt(32) / 9, rel=1e-5)
    p2 = {k: v for k, v in res["cases"]["p2"].items() if k != "per_class"}
    assert p2 == pytest.approx({"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0})
    assert res["cases"]["p1"]["per_class"]["dice"] == pytest.approx([8 / 9])  # one class: itself
    assert res["dice"] == pytest.approx((8 / 9 + 1.0) / 2)
    assert res["hd95"] == pytest.approx(0.4 * math.sqrt(32), rel=1e-5)
    assert isinstance(res["dice"], float)


def test_evaluate_site_with_lcc_and_threshold():
    ids, sl, probs, labels = _tiny_site()
    res = evaluate_site(ids, sl, probs, labels, largest_cc=True)
    assert res["dice"] == pytest.approx(1.0) and res["hd95"] == pytest.approx(0.0)
    # raising the threshold above 0.5 also drops the spurious pixel
    res_t = evaluate_site(ids, sl, probs, labels, largest_cc=False, threshold=0.6)
    assert res_t["cases"]["p1"]["dice"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        evaluate_site([], [], [], [], largest_cc=False)


def test_evaluate_site_lcc_is_per_case_volume():
    # X (2x2) on both slices = 8 px in 3-D; Y (3x2 = 6 px) only on slice 1. Label = X.
    lab = np.zeros((1, 8, 8))
    lab[0, 0:2, 0:2] = 1
    p0 = lab.copy()
    p1 = lab.copy()
    p1[0, 5:8, 5:7] = 1
    res = evaluate_site(["c", "c"], [0, 1], [p0, p1], [lab, lab], largest_cc=True)
    assert res["dice"] == pytest.approx(1.0)  # per-slice LCC would have kept Y on slice 1 instead
    res_no = evaluate_site(["c", "c"], [0, 1], [p0, p1], [lab, lab], largest_cc=False)
    assert res_no["dice"] == pytest.approx(2 * 8 / (14 + 8))


def test_mean_over_sites_is_unweighted():
    sites = {
        "A": {"dice": 0.8, "iou": 0.7, "hd95": 2.0, "assd": 1.0, "n_cases": 30, "cases": {}},
        "B": {"dice": 0.4, "iou": 0.3, "hd95": 6.0, "assd": 3.0, "n_cases": 1, "cases": {}},
    }
    out = mean_over_sites(sites)
    assert out == pytest.approx({"dice": 0.6, "iou": 0.5, "hd95": 4.0, "assd": 2.0, "n_sites": 2})
    assert out["n_sites"] == 2
    with pytest.raises(ValueError):
        mean_over_sites({})
    with pytest.raises(ValueError):
        mean_over_sites({"A": {"dice": 1.0}})


def test_mean_over_sites_from_evaluate_site():
    ids, sl, probs, labels = _tiny_site()
    a = evaluate_site(ids, sl, probs, labels, largest_cc=False)  # dice (8/9 + 1) / 2
    b = evaluate_site(ids, sl, probs, labels, largest_cc=True)  # dice 1
    out = mean_over_sites({"A": a, "B": b})
    assert out["dice"] == pytest.approx(((8 / 9 + 1) / 2 + 1) / 2)


# --------------------------------------------------------------------------------------- per class


def _two_class_site():
    """Two cases of one 8x8 slice, two overlapping classes (like disc and cup).

    Class 0 (the big square) is predicted perfectly in both cases; class 1 (the small square) is perfect in
    case "a" and half missed in case "b" (Dice 2*2/(4+2) = 2/3).
    """
    lab = np.zeros((2, 8, 8))
    lab[0, 1:7, 1:7] = 1.0
    lab[1, 3:5, 3:5] = 1.0
    half = lab.copy()
    half[1, 3:5, 4] = 0.0
    return ["a", "b"], [0, 0], [lab * 0.9, half * 0.9], [lab, lab]


def test_evaluate_site_reports_each_class_beside_the_mean():
    ids, sl, probs, labels = _two_class_site()
    res = evaluate_site(ids, sl, probs, labels, largest_cc=False)
    assert res["cases"]["b"]["per_class"]["dice"] == pytest.approx([1.0, 2 / 3])
    assert res["cases"]["b"]["dice"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert res["per_class"]["dice"] == pytest.approx([1.0, (1.0 + 2 / 3) / 2])
    assert res["per_class"]["iou"] == pytest.approx([1.0, (1.0 + 1 / 2) / 2])
    assert set(res["per_class"]) == set(METRIC_NAMES)
    # the site's mean over classes is the mean of its per-class values
    assert res["dice"] == pytest.approx(np.mean(res["per_class"]["dice"]))
    assert res["per_class"]["hd95"][0] == 0.0 and res["per_class"]["hd95"][1] > 0.0


def test_mean_over_sites_averages_each_class():
    ids, sl, probs, labels = _two_class_site()
    a = evaluate_site(ids, sl, probs, labels, largest_cc=False)
    b = evaluate_site(ids[:1], sl[:1], probs[:1], labels[:1], largest_cc=False)  # case "a" only: perfect
    out = mean_over_sites({"A": a, "B": b})
    assert out["per_class"]["dice"] == pytest.approx([1.0, ((1.0 + 2 / 3) / 2 + 1.0) / 2])


def test_mean_per_class_refuses_to_mix_class_counts():
    two = {"dice": [1.0, 0.5]}
    assert mean_per_class([two, {"dice": [0.0, 0.5]}]) == {"dice": [0.5, 0.5]}
    assert mean_per_class([two, {"dice": [1.0]}]) is None  # different data sets
    assert mean_per_class([two, None]) is None  # a result written before per-class values
    assert "per_class" not in mean_over_sites({"A": {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0}})
