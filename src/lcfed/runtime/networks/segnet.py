"""The LC-Fed segmentation network: U-Net body + PCS + personal head + personal Head Calibration.

Parameter names carry the federation contract (see :mod:`lcfed.runtime.contract`): ``encoder.*``,
``pcs.*`` and ``decoder.*`` are the shared body, ``head.*`` is the personal head that is banked, and
``hc.*`` is the personal Head Calibration that never leaves the site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibration import HeadCalibration
from .pcs import PersonalizedChannelSelection
from .unet import UNetDecoder, UNetEncoder, kaiming_init

__all__ = ["LCFedUNet", "Features"]


@dataclass
class Features:
    """Intermediate outputs of one forward pass through the body."""

    feature: torch.Tensor  # F, (B, 2n, H, W)
    bottleneck: torch.Tensor  # f before PCS, (B, 16n, H/16, W/16)
    attention: torch.Tensor | None  # PCS attention M_i, (B, 16n, 1, 1)


class LCFedUNet(nn.Module):
    """2-D U-Net with optional PCS and Head Calibration (method.md sections 2-5).

    Args:
        in_channels: image channels (1 for MRI, 3 for RGB).
        n_classes: C, sigmoid output channels (multi-label).
        width: n, the base width (16 in the paper preset).
        n_sites: K, number of sites (length of the PCS one-hot).
        norm: "instance" (no parameters, the paper) or "batch" (the FedBN baseline).
        use_pcs: include Personalized Channel Selection on the bottleneck.
        use_hc: include the Head Calibration module.
        pcs_reduction: squeeze ratio of the PCS MLP.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 1,
        width: int = 16,
        n_sites: int = 1,
        norm: str = "instance",
        use_pcs: bool = True,
        use_hc: bool = True,
        pcs_reduction: int = 16,
    ):
        super().__init__()
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even number >= 2, got {width}")
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.n_sites = n_sites
        self.encoder = UNetEncoder(in_channels, width, norm)
        self.pcs = PersonalizedChannelSelection(16 * width, n_sites, pcs_reduction) if use_pcs else None
        self.decoder = UNetDecoder(width, norm)
        self.feature_channels = self.decoder.out_channels
        self.head = nn.Conv2d(self.feature_channels, n_classes, 1, bias=True)
        self.hc = HeadCalibration(self.feature_channels, n_classes) if use_hc else None
        kaiming_init(self)
        if self.hc is not None:
            self.hc.reset_parameters()  # HC keeps its own (zero) init, see HeadCalibration

    def features(self, x: torch.Tensor, site_index: torch.Tensor | int) -> Features:
        """Body forward pass: encoder, PCS gate on the bottleneck, decoder -> F."""
        feats = self.encoder(x)
        f = feats[-1]
        attention = None
        if self.pcs is not None:
            if isinstance(site_index, int):
                site_index = torch.full((x.shape[0],), site_index, dtype=torch.long, device=x.device)
            gated, attention = self.pcs(f, site_index)
        else:
            gated = f
        return Features(self.decoder(gated, feats[:-1]), f, attention)

    def forward(self, x: torch.Tensor, site_index: torch.Tensor | int = 0) -> torch.Tensor:
        """Logits of the site's own head (before Head Calibration)."""
        return self.head(self.features(x, site_index).feature)

    def head_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This site's head as (C, D) weight and (C,) bias, the format of the head bank."""
        return self.head.weight.flatten(1), self.head.bias
