"""Losses of LC-Fed (method.md section 6)."""

from __future__ import annotations

import torch

__all__ = ["soft_dice_loss"]

SMOOTH = 1e-5


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = SMOOTH) -> torch.Tensor:
    """Batch-level soft Dice over classes: ``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)``, mean over classes.

    Sums run over the batch and the spatial axes (not per image). Computed in float32.

    Args:
        prob: sigmoid probabilities (B, C, H, W).
        target: binary targets (B, C, H, W).
    """
    p = prob.float().transpose(0, 1).flatten(1)
    y = target.float().transpose(0, 1).flatten(1)
    dice = (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)
    return 1.0 - dice.mean()
