"""Algorithm registry: one name per method (and per LC-Fed variant); one FLARE job per name."""

from __future__ import annotations

from collections.abc import Callable

from .base import Algorithm, HeadBank, ModelSpec, Precision, SiteContext
from .baselines import Ditto, FedAvgBN, FedAvgFT, FedBN, FedProx, Local
from .fedavg import FedAvg
from .lcfed import HC_SCHEDULES, LCFed

__all__ = [
    "ALGORITHMS",
    "BASELINES",
    "DEFAULT_HC_SCHEDULE",
    "LCFED_VARIANTS",
    "Ditto",
    "FedAvgBN",
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

# LC-Fed's default HC schedule is "staged": on the demo budget "joint" trained HC on moving features and
# its calibrated output fell behind the head's own prediction (see the README's benchmark section)
DEFAULT_HC_SCHEDULE = "staged"

ALGORITHMS: dict[str, Callable[[], Algorithm]] = {
    "lcfed": lambda: LCFed(DEFAULT_HC_SCHEDULE, name="lcfed"),
    "lcfed-joint": lambda: LCFed("joint", name="lcfed-joint"),
    "lcfed-no-pcs": lambda: LCFed(DEFAULT_HC_SCHEDULE, use_pcs=False, name="lcfed-no-pcs"),
    "lcfed-no-contrastive": lambda: LCFed(DEFAULT_HC_SCHEDULE, use_contrastive=False, name="lcfed-no-contrastive"),
    "lcfed-no-hc": lambda: LCFed(DEFAULT_HC_SCHEDULE, use_hc=False, name="lcfed-no-hc"),
    # not in method.md: the site embedding stays at the site, which brings LC-Fed's bytes within 1% of FedAvg's
    "lcfed-private-embedding": lambda: LCFed(
        DEFAULT_HC_SCHEDULE, share_embedding=False, name="lcfed-private-embedding"
    ),
    # not in method.md: LC-Fed with site-local normalisation (BatchNorm state kept at the site, as FedBN's)
    "lcfed-pn": lambda: LCFed(DEFAULT_HC_SCHEDULE, personal_norm=True, name="lcfed-pn"),
    "lcfed-pn-no-hc": lambda: LCFed(DEFAULT_HC_SCHEDULE, use_hc=False, personal_norm=True, name="lcfed-pn-no-hc"),
    "local": Local,
    "fedavg": FedAvg,
    "fedavg-ft": FedAvgFT,
    "fedprox": FedProx,
    "fedavg-bn": FedAvgBN,
    "fedbn": FedBN,
    # FedRep = personal head + head-then-body alternation, no PCS, no HC
    "fedrep": lambda: LCFed(
        "joint", use_pcs=False, use_hc=False, name="fedrep", description="FedRep (personal head, head-then-body)"
    ),
    "ditto": Ditto,
}
BASELINES = ("local", "fedavg", "fedavg-ft", "fedprox", "fedavg-bn", "fedbn", "fedrep", "ditto")
LCFED_VARIANTS = (
    "lcfed",
    "lcfed-joint",
    "lcfed-no-pcs",
    "lcfed-no-contrastive",
    "lcfed-no-hc",
    "lcfed-private-embedding",
    "lcfed-pn",
    "lcfed-pn-no-hc",
)


def get_algorithm(name: str) -> Algorithm:
    """A fresh algorithm object by registry name."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}") from None
