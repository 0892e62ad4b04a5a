"""Algorithm registry: one name per method (and per LC-Fed variant); one FLARE job per name."""

from __future__ import annotations

from collections.abc import Callable

from .base import Algorithm, HeadBank, ModelSpec, Precision, SiteContext
from .fedavg import FedAvg
from .lcfed import HC_SCHEDULES, LCFed

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "HeadBank",
    "ModelSpec",
    "Precision",
    "SiteContext",
    "FedAvg",
    "LCFed",
    "HC_SCHEDULES",
    "get_algorithm",
]

ALGORITHMS: dict[str, Callable[[], Algorithm]] = {
    "lcfed": lambda: LCFed("joint", name="lcfed"),
    "lcfed-staged": lambda: LCFed("staged", name="lcfed-staged"),
    "lcfed-no-pcs": lambda: LCFed("joint", use_pcs=False, name="lcfed-no-pcs"),
    "lcfed-no-contrastive": lambda: LCFed("joint", use_contrastive=False, name="lcfed-no-contrastive"),
    "lcfed-no-hc": lambda: LCFed("joint", use_hc=False, name="lcfed-no-hc"),
    "fedavg": FedAvg,
}


def get_algorithm(name: str) -> Algorithm:
    """A fresh algorithm object by registry name."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None
