"""The server's view of the model: built from the job's arguments alone (the server holds no data)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms import Algorithm, ModelSpec, get_algorithm
from ..config import TrainConfig, make_config
from ..trainer import seed_everything

__all__ = ["reference_model", "MODEL_ARGS"]

# the job's model arguments, which every bundle component of a job receives and FLARE must always export
# (its Job API drops an argument equal to its default otherwise)
MODEL_ARGS = ("algorithm", "sites", "preset", "options", "in_channels", "n_classes")


def reference_model(
    algorithm: str,
    sites: list[str] | None,
    preset: str,
    options: dict[str, Any] | None,
    in_channels: int,
    n_classes: int,
) -> tuple[Algorithm, nn.Module, TrainConfig]:
    """The algorithm, a freshly seeded model (the same init as every site's) and the run configuration."""
    sites = list(sites or [])
    if not sites:
        raise ValueError("the job lists no sites")
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ValueError(f"the job's site list names {dupes} more than once: {sites}")
    config = make_config(preset, **(options or {}))
    algo = get_algorithm(algorithm)
    seed_everything(config.seed)
    model = algo.build_model(ModelSpec(in_channels, n_classes, len(sites), config.width))
    return algo, model, config
