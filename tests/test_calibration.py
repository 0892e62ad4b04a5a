"""Prediction-level calibration at the level of its maths (method.md section 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lcfed.runtime.algorithms import HeadBank
from lcfed.runtime.contract import bank_key
from lcfed.runtime.losses import soft_dice_loss
from lcfed.runtime.networks import (
    HeadCalibration,
    LCFedUNet,
    bank_predictions,
    calibration_maps,
    disagreement_map,
    gaussian_1d,
    gaussian_2d,
    gaussian_mass,
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
    # the calibrated features follow F_U = F * (G * B) + F and F_P = F * (G * P / mass(G)) + F, class by class
    cal = hc.calibrated_features(feature, prob, peaks)
    a_u = separable_gaussian_filter(peaks)
    a_p = separable_gaussian_filter(prob) / float(gaussian_2d(dtype=torch.float64).sum())
    torch.testing.assert_close(cal[:, 0:4], feature * a_u[:, 0:1] + feature)
    torch.testing.assert_close(cal[:, 4:8], feature * a_p[:, 0:1] + feature)
    torch.testing.assert_close(cal[:, 8:12], feature * a_u[:, 1:2] + feature)
    torch.testing.assert_close(cal[:, 12:16], feature * a_p[:, 1:2] + feature)


def test_gaussian_mass_is_the_sum_of_the_peak_one_kernel_and_a_p_is_a_local_mean_of_p():
    assert gaussian_mass() == pytest.approx(float(gaussian_2d(dtype=torch.float64).sum()), rel=1e-12)
    hc = HeadCalibration(feature_channels=2, n_classes=1)
    feature = torch.ones(1, 2, 80, 80)
    prob = torch.ones(1, 1, 80, 80)
    cal = hc.calibrated_features(feature, prob, torch.zeros_like(prob))
    # away from the zero-padded border a constant P = 1 gives A_P = 1 (a weighted mean), so F_P = 2 F
    torch.testing.assert_close(cal[0, 2:4, 20:60, 20:60], torch.full((2, 40, 40), 2.0))
    assert float(cal[:, 2:4].max()) <= 2.0 + 1e-5
    # a lone peak gives A_U = 1 at the peak (the paper's peak-1 Gaussian is kept for the sparse peaks)
    peaks = torch.zeros_like(prob)
    peaks[0, 0, 40, 40] = 1
    cal = hc.calibrated_features(feature, prob, peaks)
    assert float(cal[0, 0, 40, 40]) == pytest.approx(2.0)


def _first_step(inputs: torch.Tensor, label: torch.Tensor, n_classes: int, lr: float = 1e-3) -> torch.Tensor:
    """|S* logit change| after one Adam step of HC's 3x3 conv from its zero init."""
    conv = torch.nn.Conv2d(inputs.shape[1], n_classes, 3, padding=1)
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(conv.bias)
    opt = torch.optim.Adam(conv.parameters(), lr=lr)
    before = conv(inputs).detach()
    soft_dice_loss(torch.sigmoid(conv(inputs)), label).backward()
    opt.step()
    return (conv(inputs).detach() - before).abs()


def test_one_adam_step_moves_the_hc_logits_by_order_one():
    """HC's scaling: from its zero init one Adam step at lr 1e-3 moves S*'s logits by O(1), not by tens."""
    torch.manual_seed(0)
    n_classes = 2
    model = LCFedUNet(in_channels=1, n_classes=n_classes, width=8, n_sites=3)
    image = torch.rand(4, 1, 96, 96)
    with torch.no_grad():
        feature = model.features(image, 0).feature  # F after IN-ReLU, as HC sees it
    # a confident head on a large object (the worst case for the dense map A_P) and isolated peaks
    label = torch.zeros(4, n_classes, 96, 96)
    label[:, :, 24:72, 20:76] = 1
    prob = label.clone()
    peaks = pick_peaks(disagreement_map(torch.sigmoid(model.head(feature)).detach(), label[None]))
    hc = HeadCalibration(feature.shape[1], n_classes)
    step = _first_step(hc.calibrated_features(feature, prob, peaks), label, n_classes)
    assert 0.01 < float(step.mean()) < 1.0
    assert float(step.max()) < 5.0
    # the paper's literal peak-1 G * P (what the scaling replaces) moves them by tens
    a_u, a_p = separable_gaussian_filter(peaks), separable_gaussian_filter(prob)
    literal = torch.cat(
        [
            t
            for c in range(n_classes)
            for t in (feature * a_u[:, c : c + 1] + feature, feature * a_p[:, c : c + 1] + feature)
        ],
        dim=1,
    )
    assert float(_first_step(literal, label, n_classes).max()) > 10 * float(step.max())


def test_calibration_maps_are_fp32_under_bf16_autocast():
    """P_i, U~ and B are the fp32 ones under autocast, for the own head and the banked heads alike."""
    torch.manual_seed(0)
    d, n_classes = 8, 2
    feature = torch.rand(2, d, 48, 48).bfloat16().float()  # F as a bf16 decoder would hand it over
    own_w = torch.randn(n_classes, d, 1, 1) * 0.5
    own_b = torch.full((n_classes,), 4.0)  # confident: P near 1, where bf16 rounds by ~4e-3
    others_w = (own_w.flatten(1) + 1e-3 * torch.randn(3, n_classes, d)).contiguous()
    others_b = own_b.expand(3, n_classes).clone()
    reference = calibration_maps(feature, own_w, own_b, (others_w, others_b))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = calibration_maps(feature, own_w, own_b, (others_w, others_b))
        # what the maps would see without the fp32 region: the own head's P_i rounded to bf16
        naive = torch.sigmoid(F.conv2d(feature, own_w, own_b))
    for ref, got in zip(reference, mixed):
        assert got.dtype == torch.float32
        assert torch.equal(ref, got)
    assert naive.dtype == torch.bfloat16
    assert float((naive.float() - reference[0]).abs().max()) > 1e-3  # so the fp32 region is what matters
    # and that rounding, max-normalised, would make peaks where the heads agree
    u_naive = disagreement_map(naive.float(), bank_predictions(feature, others_w, others_b))
    assert not torch.equal(pick_peaks(u_naive), reference[2])
