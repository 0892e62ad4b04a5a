"""Prediction-level calibration at the level of its maths (method.md section 5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcfed.runtime.algorithms import HeadBank
from lcfed.runtime.contract import bank_key
from lcfed.runtime.networks import (
    HeadCalibration,
    bank_predictions,
    disagreement_map,
    gaussian_1d,
    gaussian_2d,
    pick_peaks,
    separable_gaussian_filter,
)
from lcfed.runtime.networks.calibration import square_max_filter


def test_gaussian_is_31x31_sigma6_with_peak_one():
    g = gaussian_2d()
    assert g.shape == (31, 31)
    assert g.max() == 1.0 and g[15, 15] == 1.0
    assert math.isclose(float(g[15, 15 + 6]), math.exp(-0.5), rel_tol=1e-6)  # one sigma from the centre
    # peak-normalised, not sum-normalised: the sum is about 2 pi sigma^2
    assert 200 < float(g.sum()) < 230


def test_separable_filter_equals_2d_convolution():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 37, dtype=torch.float64)
    g2 = gaussian_2d(dtype=torch.float64)
    direct = F.conv2d(x.reshape(6, 1, 40, 37), g2[None, None], padding=15).reshape(2, 3, 40, 37)
    torch.testing.assert_close(separable_gaussian_filter(x), direct)
    # a single peak becomes exactly the kernel (peak 1 at the peak)
    spike = torch.zeros(1, 1, 61, 61, dtype=torch.float64)
    spike[0, 0, 30, 30] = 1
    out = separable_gaussian_filter(spike)
    assert out.max() == 1.0
    torch.testing.assert_close(out[0, 0, 15:46, 15:46], g2)
    assert torch.equal(gaussian_1d(dtype=torch.float64)[:, None] * gaussian_1d(dtype=torch.float64)[None], g2)


def test_peak_picking_keeps_exactly_local_maxima_above_threshold():
    u = torch.zeros(1, 1, 100, 100)
    # three isolated maxima: two above 0.2, one below
    u[0, 0, 10, 10] = 1.0
    u[0, 0, 70, 80] = 0.5
    u[0, 0, 50, 20] = 0.15
    # a smooth bump around (10, 10) that must not create extra peaks within the 31x31 window
    for dy in range(-5, 6):
        for dx in range(-5, 6):
            if dy or dx:
                u[0, 0, 10 + dy, 10 + dx] = 0.9 - 0.01 * (abs(dy) + abs(dx))
    # a lower value 10 px from the 0.5 peak: inside its window, not a peak
    u[0, 0, 70, 90] = 0.4
    # a second value far enough (>15 px) from any higher one is its own peak
    u[0, 0, 70, 40] = 0.3
    peaks = pick_peaks(u)
    got = {tuple(i.tolist()) for i in torch.nonzero(peaks[0, 0])}
    assert got == {(10, 10), (70, 80), (70, 40)}
    assert set(peaks.unique().tolist()) <= {0.0, 1.0}


def test_separable_max_filter_equals_31x31_max_pool():
    torch.manual_seed(0)
    u = torch.rand(2, 3, 50, 45)
    torch.testing.assert_close(square_max_filter(u), F.max_pool2d(u, 31, stride=1, padding=15), rtol=0, atol=0)


def test_disagreement_map_formula_and_normalisation():
    own = torch.tensor([[[[0.2, 0.9], [0.5, 0.5]]]])  # (1, 1, 2, 2)
    others = torch.stack(
        [own + torch.tensor([[[[0.4, 0.0], [0.0, 0.1]]]]), own - torch.tensor([[[[0.2, 0.0], [0.0, 0.1]]]])]
    )
    u = disagreement_map(own, others)
    raw = torch.sqrt(((others - own) ** 2).mean(0))
    torch.testing.assert_close(u, raw / raw.max())
    assert float(u.max()) == 1.0
    # no other head yet (first round) or full agreement: a zero map, no division by zero
    assert torch.equal(disagreement_map(own, None), torch.zeros_like(own))
    assert torch.equal(disagreement_map(own, torch.stack([own, own])), torch.zeros_like(own))


def test_bank_predictions_runs_every_banked_head():
    torch.manual_seed(0)
    feature = torch.randn(2, 8, 5, 5)
    heads = [torch.nn.Conv2d(8, 3, 1) for _ in range(4)]
    w = torch.stack([h.weight.flatten(1) for h in heads])
    b = torch.stack([h.bias for h in heads])
    probs = bank_predictions(feature, w, b)
    assert probs.shape == (4, 2, 3, 5, 5)
    for k, h in enumerate(heads):
        torch.testing.assert_close(probs[k], torch.sigmoid(h(feature)))


def test_head_bank_excludes_own_head_and_keeps_sites_apart():
    bank = HeadBank()
    params = {}
    for i, site in enumerate(["a", "b", "c"]):
        params[bank_key(site, "head.weight")] = torch.full((2, 4, 1, 1), float(i))
        params[bank_key(site, "head.bias")] = torch.full((2,), float(i))
    params["encoder.x"] = torch.zeros(1)
    used = bank.update(params)
    assert "encoder.x" not in used and len(used) == 6
    w, b = bank.others("b", torch.device("cpu"))
    assert w.shape == (2, 2, 4)
    assert sorted(b[:, 0].tolist()) == [0.0, 2.0]  # a and c, never b's own


def test_head_calibration_shape_range_and_formula():
    torch.manual_seed(0)
    hc = HeadCalibration(feature_channels=4, n_classes=2)
    feature = torch.randn(3, 4, 40, 40)
    prob = torch.rand(3, 2, 40, 40)
    peaks = pick_peaks(disagreement_map(prob, torch.rand(2, 3, 2, 40, 40)))
    # at its zero initialisation S* is 0.5 everywhere; with weights it is sigmoid(conv3x3(calibrated features))
    torch.testing.assert_close(hc(feature, prob, peaks), torch.full((3, 2, 40, 40), 0.5))
    with torch.no_grad():
        hc.conv.weight.normal_(0, 0.05)
        hc.conv.bias.normal_(0, 0.1)
    out = hc(feature, prob, peaks)
    assert out.shape == (3, 2, 40, 40)
    expected = torch.sigmoid(
        torch.nn.functional.conv2d(
            hc.calibrated_features(feature, prob, peaks), hc.conv.weight, hc.conv.bias, padding=1
        )
    )
    torch.testing.assert_close(out, expected)
    assert hc.conv.in_channels == 2 * 4 * 2  # 64*C at the paper's width (D = 32)
    # the calibrated features follow F_U = F * (G * B) + F and F_P = F * (G * P) + F, class by class
    cal = hc.calibrated_features(feature, prob, peaks)
    a_u = separable_gaussian_filter(peaks)
    a_p = separable_gaussian_filter(prob)
    torch.testing.assert_close(cal[:, 0:4], feature * a_u[:, 0:1] + feature)
    torch.testing.assert_close(cal[:, 4:8], feature * a_p[:, 0:1] + feature)
    torch.testing.assert_close(cal[:, 8:12], feature * a_u[:, 1:2] + feature)
    torch.testing.assert_close(cal[:, 12:16], feature * a_p[:, 1:2] + feature)
