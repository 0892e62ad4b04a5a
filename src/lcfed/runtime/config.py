"""Presets and the run configuration shared by the plain trainer, the FLARE learner and the jobs.

A few presets instead of many flags (``paper`` = the paper's setting; ``demo`` = a CPU demo that
finishes in minutes; ``tiny`` = tests). Every field can be overridden by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["TrainConfig", "PRESETS", "make_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how a site trains and evaluates.

    Args:
        preset: name of the preset this was built from.
        width: U-Net base width n.
        size: working image size (square), images are resized to size x size.
        batch_size: samples per iteration.
        iterations: local iterations per round.
        rounds: federated rounds of network training; the same budget for every algorithm.
        personal_iterations: FedRep-style alternation: the first iterations of a round update only the
            personal parameters (LC-Fed, FedRep); the rest only the shared ones.
        lr: Adam learning rate (constant; betas 0.9, 0.999).
        alpha: weight of the contrastive site-embedding term.
        hc_rounds: for the "staged" HC schedule, rounds of HC-only training (network frozen) added after
            the ``rounds`` network rounds; ``None`` = a quarter of ``rounds``, rounded up (paper 300 -> 75,
            demo 16 -> 4, tiny 2 -> 1). Algorithms without staged HC ignore it.
        hc_lr: Adam learning rate of Head Calibration; ``None`` = ``lr``.
        fedprox_mu: proximal weight of FedProx.
        ditto_lambda: proximal weight of Ditto's personal model.
        seed: seed of initialisation, sampling and the data split.
        amp: mixed precision when CUDA is used.
        eval_batch_size: batch size for validation and testing.
    """

    preset: str = "demo"
    width: int = 8
    size: int = 96
    batch_size: int = 6
    iterations: int = 20
    rounds: int = 16
    personal_iterations: int = 4
    lr: float = 1e-3
    alpha: float = 0.1
    hc_rounds: int | None = None
    hc_lr: float | None = None
    fedprox_mu: float = 0.01
    ditto_lambda: float = 0.1
    seed: int = 0
    amp: bool = True
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.hc_rounds is not None and self.hc_rounds < 0:
            raise ValueError(f"hc_rounds must be >= 0 (or None for a quarter of rounds), got {self.hc_rounds}")
        if self.hc_lr is not None and not self.hc_lr > 0:
            raise ValueError(f"hc_lr must be > 0 (or None for lr), got {self.hc_lr}")

    @property
    def hc_stage_rounds(self) -> int:
        """Rounds of the staged HC stage (``hc_rounds``, default a quarter of ``rounds`` rounded up)."""
        return -(-self.rounds // 4) if self.hc_rounds is None else self.hc_rounds

    @property
    def hc_start_round(self) -> int:
        """First round of the staged HC stage: right after the ``rounds`` network rounds."""
        return self.rounds

    @property
    def hc_learning_rate(self) -> float:
        """Adam learning rate of Head Calibration."""
        return self.lr if self.hc_lr is None else self.hc_lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, TrainConfig] = {
    # the paper: n=16 at 384x384, batch 6, 50 iterations (10 personal) per round, 300 rounds
    "paper": TrainConfig(
        preset="paper", width=16, size=384, batch_size=6, iterations=50, rounds=300, personal_iterations=10
    ),
    # CPU demo: same method and schedule shape (1/5 of the iterations personal), smaller and shorter
    "demo": TrainConfig(preset="demo"),
    # tests: seconds
    "tiny": TrainConfig(
        preset="tiny", width=4, size=32, batch_size=2, iterations=3, rounds=2, personal_iterations=1, eval_batch_size=8
    ),
}


def make_config(preset: str = "demo", **overrides: Any) -> TrainConfig:
    """Preset plus overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    return replace(PRESETS[preset], **overrides)
