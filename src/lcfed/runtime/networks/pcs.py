"""Personalized Channel Selection (PCS) with a learned site embedding (method.md sections 3-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PersonalizedChannelSelection", "contrastive_site_loss"]


class PersonalizedChannelSelection(nn.Module):
    """Site-steered channel attention on the bottleneck feature.

    The site embedding is ``xi_k = W2 ReLU(W1 e_k)`` (1x1 convs without bias, K -> C -> C) of the
    one-hot site vector ``e_k``. The shared MLP ``g`` (1x1 conv 2C -> C/r, ReLU, 1x1 conv C/r -> C,
    no bias) sees ``[avgpool(f); xi]`` and ``[maxpool(f); xi]``; the attention is
    ``M = sigmoid(g([a; xi]) + g([m; xi]))`` and the output ``f * (1 + M)`` (a soft gate).

    All parameters are registered and shared (averaged by the server); the site enters only
    through the one-hot input.

    Args:
        channels: C, the bottleneck channels.
        n_sites: K, the number of sites (length of the one-hot vector).
        reduction: r, the squeeze ratio of g (16 in the paper).
    """

    def __init__(self, channels: int, n_sites: int, reduction: int = 16):
        super().__init__()
        if n_sites < 1:
            raise ValueError(f"PCS needs at least one site, got n_sites={n_sites}")
        self.n_sites = n_sites
        hidden = max(channels // reduction, 1)
        self.embed = nn.Sequential(
            nn.Conv2d(n_sites, channels, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
        )
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def site_embedding(self, site_index: torch.Tensor) -> torch.Tensor:
        """xi for a 1-D tensor of site indices -> (B, C, 1, 1)."""
        onehot = F.one_hot(site_index, self.n_sites).to(self.embed[0].weight.dtype)
        return self.embed(onehot[:, :, None, None])

    def attention(self, f: torch.Tensor, site_index: torch.Tensor) -> torch.Tensor:
        """Channel attention M for feature f (B, C, h, w) and site indices (B,) -> (B, C, 1, 1), fp32.

        Computed in fp32 under autocast (on pooled vectors, so it costs nothing): the contrastive term
        compares the attentions of different sites, which are close, and a bf16 rounding of each would
        be of the size of their difference.
        """
        with torch.autocast(device_type=f.device.type, enabled=False):
            xi = self.site_embedding(site_index).float()
            avg = F.adaptive_avg_pool2d(f.float(), 1)
            mx = F.adaptive_max_pool2d(f.float(), 1)
            return torch.sigmoid(self.mlp(torch.cat([avg, xi], 1)) + self.mlp(torch.cat([mx, xi], 1)))

    def forward(self, f: torch.Tensor, site_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (f * (1 + M), M); the gated feature keeps f's dtype (the decoder runs under autocast)."""
        m = self.attention(f, site_index)
        return f * (1.0 + m.to(f.dtype)), m


def contrastive_site_loss(pcs: PersonalizedChannelSelection, f: torch.Tensor, site: int) -> torch.Tensor:
    """L_con = -(1/(K-1)) sum_{k != i} MSE(M_i, stopgrad(M_k)) on stopgrad(f) (method.md section 4).

    The feature is detached and the other sites' attentions are detached, so the gradient reaches
    only the PCS parameters through M_i. Returns 0 (with a graph) when K == 1.
    """
    k_sites = pcs.n_sites
    f = f.detach()
    b = f.shape[0]
    if k_sites < 2:
        return f.new_zeros(()) * sum(p.sum() for p in pcs.parameters())
    own = torch.full((b,), site, dtype=torch.long, device=f.device)
    m_own = pcs.attention(f, own)
    others = [k for k in range(k_sites) if k != site]
    with torch.no_grad():
        idx = torch.tensor(others, device=f.device).repeat_interleave(b)
        m_others = pcs.attention(f.repeat(len(others), 1, 1, 1), idx).view(len(others), b, *m_own.shape[1:])
    mse = ((m_own.unsqueeze(0).float() - m_others.float()) ** 2).mean(dim=(1, 2, 3, 4))
    return -mse.mean()
