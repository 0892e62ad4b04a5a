"""Algorithm registry: one name per method (and per LC-Fed variant); one FLARE job per name."""

from __future__ import annotations

from collections.abc import Callable

from .base import Algorithm, HeadBank, ModelSpec, Precision, SiteContext
from .baselines import Ditto, FedAvgFT, FedBN, FedProx, Local
from .fedavg import FedAvg
from .lcfed import HC_SCHEDULES, LCFed

__all__ = [
    "ALGORITHMS",
    "BASELINES",
    "LCFED_VARIANTS",
    "Ditto",
    "FedAvgFT",
    "FedBN",
    "FedProx",
    "Local",
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
    "local": Local,
    "fedavg": FedAvg,
    "fedavg-ft": FedAvgFT,
    "fedprox": FedProx,
    "fedbn": FedBN,
    # FedRep = personal head + head-then-body alternation, no PCS, no HC
    "fedrep": lambda: LCFed(
        "joint", use_pcs=False, use_hc=False, name="fedrep", description="FedRep (personal head, head-then-body)"
    ),
    "ditto": Ditto,
}
BASELINES = ("local", "fedavg", "fedavg-ft", "fedprox", "fedbn", "fedrep", "ditto")
LCFED_VARIANTS = ("lcfed", "lcfed-staged", "lcfed-no-pcs", "lcfed-no-contrastive", "lcfed-no-hc")


def get_algorithm(name: str) -> Algorithm:
    """A fresh algorithm object by registry name."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None
