"""What every algorithm is: a key contract, a model, parameter groups and one local step.

The training loop (:mod:`lcfed.runtime.trainer`) is the same for every method; algorithms differ only in
what is personal (:class:`~lcfed.runtime.contract.KeyContract`), how the model is built, and how one
iteration updates it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..contract import KeyContract, split_bank_key

__all__ = ["ModelSpec", "Precision", "HeadBank", "SiteContext", "Algorithm"]


@dataclass(frozen=True)
class ModelSpec:
    """What the data set and the federation fix about the model."""

    in_channels: int
    n_classes: int
    n_sites: int
    width: int


class Precision:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a GradScaler); plain fp32 on CPU."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.dtype = None
        if self.enabled:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)

    def step(self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero all gradients of ``model``, back-propagate ``loss`` and step only ``optimizer``."""
        model.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


class HeadBank:
    """The heads of all sites, keyed by site name, as last received from the server (never averaged)."""

    def __init__(self) -> None:
        self.heads: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.heads)

    def sites(self) -> list[str]:
        return sorted(self.heads)

    def update(self, params: Mapping[str, Any]) -> set[str]:
        """Take the ``head_bank/<site>/<key>`` entries of a received parameter dict; return the keys used."""
        used = set()
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in params.items():
            parsed = split_bank_key(name)
            if parsed is None:
                continue
            site, key = parsed
            heads.setdefault(site, {})[key] = torch.as_tensor(value).detach().clone().float()
            used.add(name)
        if heads:
            self.heads = heads
        return used

    def others(self, own_site: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stacked weights (K', C, D) and biases (K', C) of every banked head except ``own_site``'s."""
        names = [s for s in sorted(self.heads) if s != own_site]
        if not names:
            return None
        w = torch.stack([self.heads[s]["head.weight"].flatten(1) for s in names]).to(device)
        b = torch.stack([self.heads[s]["head.bias"] for s in names]).to(device)
        return w, b

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {s: {k: v.clone() for k, v in h.items()} for s, h in self.heads.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.heads = {s: {k: torch.as_tensor(v).float() for k, v in h.items()} for s, h in state.items()}


@dataclass
class SiteContext:
    """The live state of one site that an algorithm's step reads and updates."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    site_index: int
    site_name: str
    config: TrainConfig
    device: torch.device
    precision: Precision
    head_bank: HeadBank = field(default_factory=HeadBank)
    # algorithm-owned state kept at the site between rounds (e.g. the last global weights for FedProx)
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm(ABC):
    """One federated method: what is personal and how one local iteration runs.

    Subclasses set ``name``, ``contract`` and implement :meth:`build_model`, :meth:`param_groups`,
    :meth:`train_step` and :meth:`predict`.
    """

    name: str = ""
    description: str = ""
    contract: KeyContract = KeyContract()
    # True: a site is evaluated on its model after local training (its personalized model).
    # False (FedAvg, FedProx): a site is evaluated on the global model it receives from the server.
    personalized: bool = True

    @abstractmethod
    def build_model(self, spec: ModelSpec) -> nn.Module:
        """A freshly initialised model (call under a fixed seed for identical inits)."""

    @abstractmethod
    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups; the trainer gives each group its own Adam (state stays at the site)."""

    @abstractmethod
    def train_step(
        self, ctx: SiteContext, image: torch.Tensor, label: torch.Tensor, iteration: int, round_idx: int
    ) -> dict[str, float]:
        """One local iteration on one batch; returns scalar losses for logging."""

    @abstractmethod
    def predict(self, ctx: SiteContext, image: torch.Tensor) -> torch.Tensor:
        """The site's final (personalized) probabilities (B, C, H, W)."""

    def total_rounds(self, config: TrainConfig) -> int:
        """Rounds of a whole run: ``config.rounds`` of network training (plus any stage of its own)."""
        return config.rounds

    def learning_rate(self, group: str, config: TrainConfig) -> float:
        """Adam learning rate of the parameter group ``group`` (default: ``config.lr`` for every group)."""
        return config.lr

    def head_only(self, config: TrainConfig, round_idx: int) -> bool:
        """Whether a site sends only its banked head after ``round_idx`` (its shared part did not change)."""
        return False

    def merges_global(self, config: TrainConfig, round_idx: int) -> bool:
        """Whether the site takes the server's shared weights at the start of ``round_idx`` (default: yes)."""
        return True

    def on_round_start(self, ctx: SiteContext, round_idx: int) -> None:
        """Hook after the global weights are merged, before the round's first iteration."""

    def on_round_end(self, ctx: SiteContext, round_idx: int, total_rounds: int) -> None:
        """Hook after the round's last iteration, before validation."""

    def explain(self, ctx: SiteContext, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Intermediate maps for figures (at least ``prediction``); LC-Fed adds the disagreement map."""
        return {"prediction": self.predict(ctx, image)}

    @property
    def uses_head_bank(self) -> bool:
        return bool(self.contract.banked)

    def outgoing_state(self, ctx: SiteContext, round_idx: int) -> dict[str, torch.Tensor]:
        """What this site sends after ``round_idx``: the contract's shared keys plus its banked head.

        In a :meth:`head_only` round only the banked head (the server keeps the global shared model).
        """
        state = self.contract.select_outgoing(ctx.model.state_dict())
        if self.head_only(ctx.config, round_idx):
            state = {k: v for k, v in state.items() if self.contract.is_banked(k)}
        return {k: v.detach() for k, v in state.items()}


def iterate_params(model: nn.Module, prefixes: tuple[str, ...]) -> Iterator[nn.Parameter]:
    """Parameters whose name starts with one of ``prefixes``."""
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            yield p
