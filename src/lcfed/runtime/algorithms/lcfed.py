"""LC-Fed: shared U-Net body with PCS, personal head (banked) and personal Head Calibration (private)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from ..contract import KeyContract
from ..losses import soft_dice_loss
from ..networks import LCFedUNet, calibration_maps, contrastive_site_loss
from .base import Algorithm, ModelSpec, SiteContext, iterate_params

__all__ = ["LCFed", "HC_SCHEDULES"]

HC_SCHEDULES = ("joint", "staged")


class LCFed(Algorithm):
    """LC-Fed (method.md sections 3-6).

    Each round: the first ``personal_iterations`` iterations update only the personal head, the rest
    only the shared body (encoder, PCS, decoder) with soft Dice + alpha * contrastive term. HC is
    trained on detached F and P with the same Dice on S*: every iteration ("joint"), or alone in
    ``hc_rounds`` extra rounds after the ``rounds`` network rounds, with the network frozen ("staged";
    then every algorithm trains its network for the same ``rounds``). In those HC rounds a site keeps
    its own network (it does not merge the global body) and sends only its head, for the bank.

    The disagreement map, its peaks and the PCS attention maps are computed in fp32 under mixed
    precision (see :func:`lcfed.runtime.networks.calibration_maps`).

    Args:
        hc_schedule: "joint" or "staged".
        use_pcs: ablation switch for Personalized Channel Selection.
        use_contrastive: ablation switch for the contrastive site-embedding term.
        use_hc: ablation switch for Head Calibration (then the head is still banked but unused).
        share_embedding: False keeps PCS's site embedding (W1, W2) at each site instead of averaging it.
            This departs from method.md section 3 (all of PCS shared); it is the variant that brings the
            bytes a site sends within 1% of FedAvg's, since W2 (C x C) is most of PCS. The shared MLP g
            is still averaged. At site i the other sites' embeddings then come from its own copy, in
            which only column i of W1 ever receives a gradient.
        personal_norm: not in method.md (``lcfed-pn``): the U-Net's normalisation layers are BatchNorm,
            whose affine parameters and running statistics stay at the site (personal, never sent, as in
            FedBN); they train with the body. Head bank, PCS and HC are unchanged.
        name: registry name of this variant.
    """

    def __init__(
        self,
        hc_schedule: str = "joint",
        use_pcs: bool = True,
        use_contrastive: bool = True,
        use_hc: bool = True,
        share_embedding: bool = True,
        personal_norm: bool = False,
        name: str = "lcfed",
        description: str = "",
    ):
        if hc_schedule not in HC_SCHEDULES:
            raise ValueError(f"unknown HC schedule {hc_schedule!r}; choose one of {HC_SCHEDULES}")
        self.hc_schedule = hc_schedule
        self.use_pcs = use_pcs
        self.use_contrastive = use_contrastive and use_pcs
        self.use_hc = use_hc
        self.share_embedding = share_embedding or not use_pcs
        self.personal_norm = personal_norm
        self.name = name
        self.description = description or (
            f"LC-Fed, HC {hc_schedule}"
            + ("" if use_pcs else ", without PCS")
            + ("" if self.use_contrastive or not use_pcs else ", without contrastive term")
            + ("" if use_hc else ", without HC")
            + ("" if self.share_embedding else ", site embedding kept at the site")
            + (", BatchNorm kept at the site" if personal_norm else "")
        )
        # kept at the site, never sent: the site embedding when it is not shared
        private = "" if self.share_embedding else r"|pcs\.embed"
        # every normalisation layer's state (FedBN's pattern: ".norm." in the key)
        norms = r"|.*\.norm\." if personal_norm else ""
        if use_hc:
            # head: personal and sent to the server for the head bank; hc: personal, never leaves the site
            self.contract = KeyContract(personal=rf"(head|hc{private})\.{norms}", banked=r"head\.")
        else:
            # without HC the other sites' heads are never used: nothing to bank (FedRep with PCS)
            self.contract = KeyContract(personal=rf"(head{private})\.{norms}")

    @property
    def staged_hc(self) -> bool:
        return self.use_hc and self.hc_schedule == "staged"

    def total_rounds(self, config: TrainConfig) -> int:
        """``rounds`` network rounds, plus ``hc_rounds`` HC-only rounds under the staged schedule."""
        return config.rounds + (config.hc_stage_rounds if self.staged_hc else 0)

    def hc_only(self, config: TrainConfig, round_idx: int) -> bool:
        """Staged schedule: after the ``rounds`` network rounds the network is frozen and only HC learns."""
        return self.staged_hc and round_idx >= config.hc_start_round

    def head_only(self, config: TrainConfig, round_idx: int) -> bool:
        # the frozen body is not sent; the (frozen) head still is, so the server's bank holds every site
        return self.hc_only(config, round_idx)

    def learning_rate(self, group: str, config: TrainConfig) -> float:
        return config.hc_learning_rate if group == "hc" else config.lr

    def merges_global(self, config: TrainConfig, round_idx: int) -> bool:
        # a frozen network is the site's own network as trained so far: merging the global body now would
        # swap the locally adapted body under the personal head it was trained with
        return not self.hc_only(config, round_idx)

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return LCFedUNet(
            spec.in_channels,
            spec.n_classes,
            spec.width,
            spec.n_sites,
            norm="batch" if self.personal_norm else "instance",
            use_pcs=self.use_pcs,
            use_hc=self.use_hc,
        )

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        groups = {
            "body": list(iterate_params(model, ("encoder.", "pcs.", "decoder."))),
            "head": list(iterate_params(model, ("head.",))),
        }
        if self.use_hc:
            groups["hc"] = list(iterate_params(model, ("hc.",)))
        return groups

    # -- the maths of one site -------------------------------------------------------------------
    def maps(self, ctx: SiteContext, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P_i, U~, B) of the site's live head against the other banked heads, fp32, no gradient."""
        with torch.no_grad():
            bank = ctx.head_bank.others(ctx.site_name, feature.device)
            return calibration_maps(feature, ctx.model.head.weight, ctx.model.head.bias, bank)

    def _hc_step(self, ctx: SiteContext, feature: torch.Tensor, label: torch.Tensor) -> float:
        model = ctx.model
        feature = feature.detach()
        prob, _, peaks = self.maps(ctx, feature)
        with ctx.precision.autocast():
            calibrated = model.hc(feature, prob, peaks)
        loss = soft_dice_loss(calibrated, label)
        ctx.precision.step(loss, model, ctx.optimizers["hc"])
        model.hc.trained.fill_(True)
        return float(loss.detach())

    def train_step(
        self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor, iteration: int, round_idx: int
    ) -> dict[str, float]:
        model, cfg = ctx.model, ctx.config
        stats: dict[str, float] = {}
        if self.hc_only(cfg, round_idx):
            # staged: the network is frozen, only HC learns. Features as at inference (eval mode): BatchNorm
            # (lcfed-pn) then neither uses batch statistics nor moves its running statistics, so the frozen
            # network stays frozen and HC calibrates exactly the features it will see when predicting
            model.eval()
            try:
                with torch.no_grad(), ctx.precision.autocast():
                    feature = model.features(image, ctx.site_index).feature
            finally:
                model.train()
            stats["hc_dice_loss"] = self._hc_step(ctx, feature, label)
            return stats

        personal_phase = iteration < cfg.personal_iterations
        if personal_phase:
            # head-only iterations: the body runs without a graph (its parameters cannot change)
            with torch.no_grad(), ctx.precision.autocast():
                feats = model.features(image, ctx.site_index)
            with ctx.precision.autocast():
                prob = torch.sigmoid(model.head(feats.feature))
            loss = soft_dice_loss(prob, label)
            ctx.precision.step(loss, model, ctx.optimizers["head"])
            stats["dice_loss"] = float(loss.detach())
        else:
            with ctx.precision.autocast():
                feats = model.features(image, ctx.site_index)
                prob = torch.sigmoid(model.head(feats.feature))
            loss = soft_dice_loss(prob, label)
            stats["dice_loss"] = float(loss.detach())
            if self.use_contrastive and cfg.alpha > 0:
                with ctx.precision.autocast():
                    con = contrastive_site_loss(model.pcs, feats.bottleneck, ctx.site_index)
                loss = loss + cfg.alpha * con.float()
                stats["contrastive"] = float(con.detach())
            ctx.precision.step(loss, model, ctx.optimizers["body"])
        if self.use_hc and self.hc_schedule == "joint":
            stats["hc_dice_loss"] = self._hc_step(ctx, feats.feature, label)
        return stats

    def explain(self, ctx: SiteContext, image: torch.Tensor) -> dict[str, torch.Tensor]:
        model = ctx.model
        with ctx.precision.autocast():
            feature = model.features(image, ctx.site_index).feature
        own, u, peaks = self.maps(ctx, feature)
        out = {"head_prediction": own, "prediction": own, "disagreement": u, "peaks": peaks}
        calibrated = self.use_hc and bool(model.hc.trained)
        out["calibrated"] = torch.full((image.shape[0],), float(calibrated))
        if calibrated:
            with ctx.precision.autocast():
                out["prediction"] = model.hc(feature, own, peaks).float()
        return out

    def predict(self, ctx: SiteContext, image: torch.Tensor) -> torch.Tensor:
        if not self.use_hc:
            with ctx.precision.autocast():
                return torch.sigmoid(ctx.model(image, ctx.site_index)).float()
        return self.explain(ctx, image)["prediction"]
