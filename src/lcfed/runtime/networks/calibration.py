"""Prediction-level calibration: head bank, disagreement map, peak picking, Head Calibration (method.md 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "gaussian_1d",
    "gaussian_2d",
    "separable_gaussian_filter",
    "bank_predictions",
    "disagreement_map",
    "pick_peaks",
    "square_max_filter",
    "gaussian_mass",
    "fp32",
    "calibration_maps",
    "HeadCalibration",
]

KERNEL_SIZE = 31
SIGMA = 6.0
PEAK_THRESHOLD = 0.2


def gaussian_1d(size: int = KERNEL_SIZE, sigma: float = SIGMA, dtype=torch.float32, device=None) -> torch.Tensor:
    """1-D Gaussian with peak 1 (not unit sum)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    return torch.exp(-(x**2) / (2 * sigma**2))


def gaussian_2d(size: int = KERNEL_SIZE, sigma: float = SIGMA, dtype=torch.float32, device=None) -> torch.Tensor:
    """2-D Gaussian with peak 1; equals the outer product of two :func:`gaussian_1d`."""
    g = gaussian_1d(size, sigma, dtype, device)
    return g[:, None] * g[None, :]


def gaussian_mass(size: int = KERNEL_SIZE, sigma: float = SIGMA) -> float:
    """Sum of the peak-1 2-D Gaussian (about 222 for 31x31, sigma 6): its gain on a constant map."""
    return float(gaussian_1d(size, sigma, dtype=torch.float64).sum() ** 2)


def fp32(device: torch.device) -> torch.autocast:
    """A region where autocast is off on ``device``: what runs inside stays in the dtype it is given.

    Used where a low-precision rounding decides something discrete or near-tied: the disagreement map
    of nearly equal probabilities, its peaks, and the PCS attention maps of the contrastive term.
    """
    return torch.autocast(device_type=device.type, enabled=False)


def separable_gaussian_filter(x: torch.Tensor, size: int = KERNEL_SIZE, sigma: float = SIGMA) -> torch.Tensor:
    """Convolve every channel of x (B, C, H, W) with the peak-normalised Gaussian, zero padding, same size.

    Two 1-D passes (size + size multiply-adds per pixel instead of size * size).
    """
    b, c, h, w = x.shape
    g = gaussian_1d(size, sigma, dtype=x.dtype, device=x.device)
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(y, g.view(1, 1, size, 1), padding=(size // 2, 0))
    y = F.conv2d(y, g.view(1, 1, 1, size), padding=(0, size // 2))
    return y.view(b, c, h, w)


def bank_predictions(feature: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """Run every banked 1x1 head on feature F.

    Args:
        feature: F, (B, D, H, W).
        weights: stacked head weights (K', C, D) (1x1 conv kernels without the spatial dims).
        biases: stacked head biases (K', C).

    Returns:
        sigmoid probabilities (K', B, C, H, W).
    """
    logits = torch.einsum("kcd,bdhw->kbchw", weights.to(feature.dtype), feature)
    return torch.sigmoid(logits + biases.to(feature.dtype)[:, None, :, None, None])


def disagreement_map(own: torch.Tensor, others: torch.Tensor | None) -> torch.Tensor:
    """Normalised disagreement U~ between the site's own head and the other sites' heads.

    ``U = sqrt(mean_{k != i} (P_k - P_i)^2)`` per pixel and class, then divided by its spatial max per
    image and class (a map that is zero everywhere stays zero).

    Args:
        own: P_i, (B, C, H, W).
        others: P_k for k != i, (K-1, B, C, H, W); ``None`` or empty when no other head is known yet
            (first round), which gives a zero map.
    """
    if others is None or others.shape[0] == 0:
        return torch.zeros_like(own)
    u = torch.sqrt(((others - own.unsqueeze(0)) ** 2).mean(dim=0))
    peak = u.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, u / peak.clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(u))


def square_max_filter(u: torch.Tensor, size: int = KERNEL_SIZE) -> torch.Tensor:
    """maxpool_{size x size, stride 1} with same-size output, as two 1-D passes (a box max is separable)."""
    pooled = F.max_pool2d(u, (size, 1), stride=1, padding=(size // 2, 0))
    return F.max_pool2d(pooled, (1, size), stride=1, padding=(0, size // 2))


def pick_peaks(u: torch.Tensor, size: int = KERNEL_SIZE, threshold: float = PEAK_THRESHOLD) -> torch.Tensor:
    """B = [U~ == maxpool_{size x size, stride 1}(U~)] AND [U~ > threshold], as a float mask."""
    return ((u == square_max_filter(u, size)) & (u > threshold)).to(u.dtype)


def calibration_maps(
    feature: torch.Tensor,
    own_weight: torch.Tensor,
    own_bias: torch.Tensor,
    others: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P_i, U~ and B of method.md section 5 for feature F, all in fp32 whatever autocast is active.

    The site's own head and the banked heads run the same fp32 1x1 conv on the same fp32 F: under bf16
    autocast the own head's P_i would otherwise be rounded (about 4e-3 near P = 1) while the banked
    heads' P_k are not, and after the per-image max normalisation that rounding alone can make peaks
    above the 0.2 threshold where the heads agree.

    Args:
        feature: F, (B, D, H, W) (any float dtype; used as fp32).
        own_weight: the site's live head, (C, D) or (C, D, 1, 1).
        own_bias: (C,).
        others: stacked weights (K', C, D) and biases (K', C) of the other banked heads, or ``None``.

    Returns:
        (P_i, U~, B), each (B, C, H, W) fp32; no gradient flows (the caller decides, see LC-Fed).
    """
    with fp32(feature.device):
        f = feature.float()
        own = bank_predictions(f, own_weight.detach().float().flatten(1)[None], own_bias.detach().float()[None])[0]
        banked = None if others is None else bank_predictions(f, others[0].float(), others[1].float())
        u = disagreement_map(own, banked)
        return own, u, pick_peaks(u)


class HeadCalibration(nn.Module):
    """Personal Head Calibration (HC); never leaves the site.

    For each class c: ``A_U = G * B_c``, ``A_P = (G * P_c) / m`` (G the peak-1 31x31 Gaussian, sigma 6,
    m = its mass, about 222), ``F_U = F * A_U + F`` and ``F_P = F * A_P + F``;
    ``S* = sigmoid(conv3x3(concat_c [F_U, F_P]))``.

    Scale (a decision of ours; the paper does not give one): the peaks B are isolated (at most one per
    31x31 window), so the peak-1 ``G * B`` is 1 at a peak and at most about 1 anywhere: ``A_U`` keeps the
    paper's peak-1 Gaussian. P is dense, so the peak-1 ``G * P`` is up to m ~ 222 inside an object and
    ``F_P`` up to ~223 F (about 1000 on trained features): from HC's zero init one Adam step at lr 1e-3
    then moved the S* logits by tens (HC saturated at once and joint HC collapsed). Dividing ``G * P`` by
    the Gaussian's mass makes ``A_P`` the Gaussian-weighted local mean of P, in [0, 1], so both maps are
    in [0, ~1], ``F_U`` and ``F_P`` within about 2 F, and one Adam step moves the logits by order 1
    (``benchmark/hc_step.py`` measures both; ``tests/test_calibration.py`` bounds it). The Gaussian maps
    and the products are computed in fp32 under autocast; only the final conv runs in low precision.

    Args:
        feature_channels: D, channels of F (2n; 32 in the paper preset).
        n_classes: C.
    """

    def __init__(self, feature_channels: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.conv = nn.Conv2d(2 * feature_channels * n_classes, n_classes, 3, padding=1, bias=True)
        self.reset_parameters()
        # whether HC has been trained at least once; until then the site's prediction is P_i
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    def reset_parameters(self) -> None:
        """Zero init: HC starts neutral (S* = 0.5) and learns from P within a few steps.

        A Kaiming init would start S* at a random function of F instead (and, with the unscaled peak-1
        ``G * P`` of the paper, deep in the sigmoid's saturation).
        """
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def calibrated_features(self, feature: torch.Tensor, prob: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """concat over classes of [F * A_U + F, F * A_P + F] -> (B, 2*D*C, H, W), fp32."""
        with fp32(feature.device):
            feature = feature.float()
            a_u = separable_gaussian_filter(peaks.float())
            a_p = separable_gaussian_filter(prob.float()) / gaussian_mass()
            parts = []
            for c in range(self.n_classes):
                parts.append(feature * a_u[:, c : c + 1] + feature)
                parts.append(feature * a_p[:, c : c + 1] + feature)
            return torch.cat(parts, dim=1)

    def forward(self, feature: torch.Tensor, prob: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
        """S* = sigmoid(conv3x3(calibrated features))."""
        return torch.sigmoid(self.conv(self.calibrated_features(feature, prob, peaks)))
