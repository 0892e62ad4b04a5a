"""FedAvg: one plain shared U-Net (no PCS, no HC), every parameter averaged."""

from __future__ import annotations

import torch
from torch import nn

from ..contract import KeyContract
from ..losses import soft_dice_loss
from ..networks import LCFedUNet
from .base import Algorithm, ModelSpec, SiteContext

__all__ = ["FedAvg"]


class FedAvg(Algorithm):
    """The shared U-Net of the paper's FedAvg baseline: soft Dice, all parameters shared."""

    name = "fedavg"
    description = "FedAvg (plain shared U-Net, evaluated on the global model)"
    contract = KeyContract()
    personalized = False

    def __init__(self, norm: str = "instance"):
        self.norm = norm

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return LCFedUNet(
            spec.in_channels, spec.n_classes, spec.width, spec.n_sites, norm=self.norm, use_pcs=False, use_hc=False
        )

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"all": list(model.parameters())}

    def loss(self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with ctx.precision.autocast():
            prob = torch.sigmoid(ctx.model(image))
        return soft_dice_loss(prob, label)

    def train_step(
        self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor, iteration: int, round_idx: int
    ) -> dict[str, float]:
        loss = self.loss(ctx, image, label)
        ctx.precision.step(loss, ctx.model, ctx.optimizers["all"])
        return {"dice_loss": float(loss.detach())}

    def predict(self, ctx: SiteContext, image: torch.Tensor) -> torch.Tensor:
        with ctx.precision.autocast():
            return torch.sigmoid(ctx.model(image)).float()
