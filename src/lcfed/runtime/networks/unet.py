"""The 2-D U-Net body of LC-Fed (method.md section 2).

Encoder widths n, 2n, 4n, 8n, 16n; decoder blocks 16n, 8n, 4n, 2n ending in a 2n-channel
full-resolution feature map F. InstanceNorm without affine parameters by default (so norms hold no
parameters); ``norm="batch"`` gives the BatchNorm variant that FedBN needs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "EncoderBlock", "DecoderBlock", "UNetEncoder", "UNetDecoder", "make_norm", "kaiming_init"]


def make_norm(kind: str, channels: int) -> nn.Module:
    """Return the normalisation layer of the given kind ("instance" without affine, or "batch")."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}: expected 'instance' or 'batch'")


class ConvNormAct(nn.Sequential):
    """conv (kxk, bias) -> norm -> optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, norm: str = "instance", act: bool = True):
        # named children so parameter names say what they are ("...conv.weight", "...norm.weight"):
        # FedBN's contract selects its personal BatchNorm state by the ".norm." in the name
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=True),
            norm=make_norm(norm, out_ch),
        )
        if act:
            layers["act"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class EncoderBlock(nn.Module):
    """Optional 2x2 max-pool, then conv3x3-IN, conv3x3-IN-ReLU, conv3x3-IN-ReLU.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        pool: whether the block starts with a 2x2 max-pool (all blocks but the first).
        norm: "instance" or "batch".
    """

    def __init__(self, in_ch: int, out_ch: int, pool: bool, norm: str = "instance"):
        super().__init__()
        self.pool = pool
        self.convs = nn.Sequential(
            ConvNormAct(in_ch, out_ch, 3, norm, act=False),
            ConvNormAct(out_ch, out_ch, 3, norm, act=True),
            ConvNormAct(out_ch, out_ch, 3, norm, act=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(x, 2)
        return self.convs(x)


class DecoderBlock(nn.Module):
    """Decoder block with p planes.

    (except the first block) conv3x3 2p->p IN ReLU; nearest 2x upsample; conv1x1 p->p/2 IN ReLU;
    concat the skip (p/2 channels); conv3x3 p->p IN ReLU.

    Args:
        planes: p.
        first: the first block takes the p-channel bottleneck directly (no 2p->p conv).
        norm: "instance" or "batch".
    """

    def __init__(self, planes: int, first: bool, norm: str = "instance"):
        super().__init__()
        self.reduce = None if first else ConvNormAct(2 * planes, planes, 3, norm)
        self.squeeze = ConvNormAct(planes, planes // 2, 1, norm)
        self.fuse = ConvNormAct(planes, planes, 3, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = self.squeeze(x)
        return self.fuse(torch.cat([x, skip], dim=1))


class UNetEncoder(nn.Module):
    """Five encoder blocks of widths n, 2n, 4n, 8n, 16n; returns all block outputs (last = bottleneck)."""

    def __init__(self, in_channels: int, width: int, norm: str = "instance"):
        super().__init__()
        widths = [width * m for m in (1, 2, 4, 8, 16)]
        blocks = []
        prev = in_channels
        for i, w in enumerate(widths):
            blocks.append(EncoderBlock(prev, w, pool=i > 0, norm=norm))
            prev = w
        self.blocks = nn.ModuleList(blocks)
        self.widths = widths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Four decoder blocks (16n, 8n, 4n, 2n planes) ending in a 2n-channel full-resolution feature."""

    def __init__(self, width: int, norm: str = "instance"):
        super().__init__()
        planes = [width * m for m in (16, 8, 4, 2)]
        self.blocks = nn.ModuleList([DecoderBlock(p, first=i == 0, norm=norm) for i, p in enumerate(planes)])
        self.out_channels = planes[-1]

    def forward(self, bottleneck: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        # skips: encoder outputs from shallow to deep, without the bottleneck
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(x, skip)
        return x


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a parameter's qualified name (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def kaiming_init(module: nn.Module, seed: int | None = None) -> None:
    """Kaiming-normal init (fan-in mode) for conv weights, zero biases (method.md section 2).

    Each conv weight is drawn from its own generator, seeded by ``seed`` (default: the seed torch was last
    seeded with, ``torch.initial_seed()``) and the weight's qualified name. So the initial weights do not
    depend on which other modules exist or in which order they were built: at one seed, every algorithm
    starts from the same U-Net body and head (a paired comparison), and an ablation that drops PCS or HC
    changes nothing else.
    """
    base = torch.initial_seed() if seed is None else int(seed)
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            key = f"{name}.weight" if name else "weight"
            generator = torch.Generator(device="cpu").manual_seed(_name_seed(base, key))
            weight = torch.empty(m.weight.shape, dtype=m.weight.dtype, device="cpu")
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)
            with torch.no_grad():
                m.weight.copy_(weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
