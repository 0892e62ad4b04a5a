"""Baselines users would pick instead of LC-Fed, on the same loop, data and budget.

Each differs from the others only in its contract (what is personal), its model and its local step:

- ``local``: no federation; every parameter stays at the site.
- ``fedavg``: one shared plain U-Net; a site is evaluated on the **global** model it receives.
- ``fedavg-ft``: FedAvg training; a site is evaluated on the global model after its local iterations
  (local fine-tuning of the global model every round).
- ``fedprox``: FedAvg with the proximal term mu/2 ||w - w_global||^2; evaluated on the global model.
- ``fedbn``: BatchNorm U-Net; all BatchNorm state (affine parameters and running statistics) stays at
  the site.
- ``fedrep``: personal head, FedRep alternation (head-only iterations, then body-only) -- LC-Fed without
  PCS and HC (see :mod:`lcfed.runtime.algorithms`).
- ``ditto``: a shared global model trained as FedAvg plus a personal model trained with the proximal
  term lambda/2 ||v - w_global||^2 (two updates per iteration).
"""

from __future__ import annotations

import torch
from torch import nn

from ..contract import KeyContract
from ..losses import soft_dice_loss
from ..networks import LCFedUNet
from .base import Algorithm, ModelSpec, SiteContext
from .fedavg import FedAvg

__all__ = ["Local", "FedAvgFT", "FedProx", "FedBN", "Ditto", "DittoNet"]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters as received this round (kept at the site for the proximal term, never sent)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _proximal(model: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for n, p in model.named_parameters():
        if n in anchor:
            term = ((p.float() - anchor[n].float()) ** 2).sum()
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class Local(FedAvg):
    """Local training only: nothing is sent or averaged."""

    name = "local"
    description = "Local training (no federation)"
    contract = KeyContract(shares_nothing=True)
    personalized = True


class FedAvgFT(FedAvg):
    """FedAvg, evaluated after local fine-tuning of the received global model."""

    name = "fedavg-ft"
    description = "FedAvg + local fine-tuning"
    personalized = True


class FedProx(FedAvg):
    """FedAvg with a proximal term towards the round's global model (weight ``fedprox_mu``)."""

    name = "fedprox"
    description = "FedProx"

    def on_round_start(self, ctx: SiteContext, round_idx: int) -> None:
        ctx.extra["global"] = _snapshot(ctx.model)

    def train_step(
        self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor, iteration: int, round_idx: int
    ) -> dict[str, float]:
        dice = self.loss(ctx, image, label)
        prox = _proximal(ctx.model, ctx.extra["global"])
        loss = dice + 0.5 * ctx.config.fedprox_mu * prox
        ctx.precision.step(loss, ctx.model, ctx.optimizers["all"])
        return {"dice_loss": float(dice.detach()), "proximal": float(prox.detach())}


class FedBN(FedAvg):
    """BatchNorm U-Net whose BatchNorm parameters and running statistics never leave the site."""

    name = "fedbn"
    description = "FedBN (BatchNorm state kept at the site)"
    contract = KeyContract(personal=r".*\.norm\.")
    personalized = True

    def __init__(self):
        super().__init__(norm="batch")


class FedAvgBN(FedAvg):
    """FedAvg on the BatchNorm U-Net, BatchNorm parameters and running statistics averaged like the rest.

    FedBN's own baseline: against ``fedbn`` it separates what keeping BatchNorm at the site buys from
    what BatchNorm itself buys over the InstanceNorm U-Net of ``fedavg``.
    """

    name = "fedavg-bn"
    description = "FedAvg with BatchNorm (BatchNorm state averaged)"

    def __init__(self):
        super().__init__(norm="batch")


class DittoNet(nn.Module):
    """Two plain U-Nets: ``global_net`` (shared, trained as FedAvg) and ``personal_net`` (never leaves)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        args = (spec.in_channels, spec.n_classes, spec.width, spec.n_sites)
        self.global_net = LCFedUNet(*args, use_pcs=False, use_hc=False)
        self.personal_net = LCFedUNet(*args, use_pcs=False, use_hc=False)
        self.personal_net.load_state_dict(self.global_net.state_dict())


class Ditto(Algorithm):
    """Ditto: per iteration one FedAvg step of the global model and one proximal step of the personal model."""

    name = "ditto"
    description = "Ditto (personal model with a proximal term to the global model)"
    contract = KeyContract(personal=r"personal_net\.")

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return DittoNet(spec)

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"global": list(model.global_net.parameters()), "personal": list(model.personal_net.parameters())}

    def on_round_start(self, ctx: SiteContext, round_idx: int) -> None:
        ctx.extra["global"] = _snapshot(ctx.model.global_net)

    def train_step(
        self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor, iteration: int, round_idx: int
    ) -> dict[str, float]:
        model = ctx.model
        with ctx.precision.autocast():
            g_loss = soft_dice_loss(torch.sigmoid(model.global_net(image)), label)
        ctx.precision.step(g_loss, model, ctx.optimizers["global"])
        with ctx.precision.autocast():
            p_loss = soft_dice_loss(torch.sigmoid(model.personal_net(image)), label)
        prox = _proximal(model.personal_net, ctx.extra["global"])
        ctx.precision.step(p_loss + 0.5 * ctx.config.ditto_lambda * prox, model, ctx.optimizers["personal"])
        return {"dice_loss": float(p_loss.detach()), "global_dice_loss": float(g_loss.detach())}

    def predict(self, ctx: SiteContext, image: torch.Tensor) -> torch.Tensor:
        with ctx.precision.autocast():
            return torch.sigmoid(ctx.model.personal_net(image)).float()
