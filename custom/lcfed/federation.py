"""An in-process federation (no FLARE): the same trainer and aggregation maths in one loop.

Used by the tests (the maths of a whole run in seconds), the site-effect check of the demo set and
the benchmark's overhead measurement (FLARE round vs the same local work).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .aggregation import HeadBankAggregation
from .algorithms import get_algorithm
from .config import TrainConfig
from .data.layout import load_dataset_info
from .data.pipeline import load_site
from .trainer import SiteTrainer

__all__ = ["build_trainers", "run_federation"]


def build_trainers(
    algo: str, data_dir: str | Path, config: TrainConfig, sites: Sequence[str] | None = None, device=None
) -> list[SiteTrainer]:
    """One :class:`SiteTrainer` per site of the data set (or of ``sites``)."""
    info = load_dataset_info(data_dir)
    sites = list(sites or info.sites)
    return [
        SiteTrainer(get_algorithm(algo), config, load_site(data_dir, s, config.size), sites, s, device) for s in sites
    ]


def run_federation(
    trainers: list[SiteTrainer],
    rounds: int,
    weighting: str = "uniform",
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds; returns per-round records with each site's validation Dice."""
    first = trainers[0]
    agg = HeadBankAggregation(first.contract, first.model_keys(), weighting)
    # every site starts from the same seeded model, so the first site's shared part is the global init
    global_params: dict[str, Any] = {
        k: v.detach().cpu().numpy() for k, v in first.model.state_dict().items() if first.contract.is_shared(k)
    }
    records = []
    for r in range(rounds):
        t0 = time.perf_counter()
        agg.reset()
        record: dict[str, Any] = {"round": r, "sites": {}}
        for t in trainers:
            t.receive(global_params)
            stats = t.train_round(r)
            val = t.evaluate("validation", surface=False)
            record["sites"][t.site] = {**stats, "val_dice": val["dice"]}
            agg.accept(t.site, t.outgoing(), n_samples=t.data.n_train)
        global_params = agg.result()
        record["time"] = time.perf_counter() - t0
        records.append(record)
        if log:
            dice = ", ".join(f"{s}={v['val_dice']:.3f}" for s, v in record["sites"].items())
            log(f"round {r + 1}/{rounds} ({record['time']:.1f} s): val dice {dice}")
    # like FLARE, the last aggregate is not sent back: each site keeps its personalized model of the last round
    return records


def site_effect(
    data_dir: str | Path, config: TrainConfig, source: str | None = None, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Train a plain U-Net on one site only; its test Dice on its own site vs on every other site.

    Shows how different the sites are (the gap is what federation and personalization must bridge).
    """
    trainers = build_trainers("fedavg", data_dir, config)
    by_site = {t.site: t for t in trainers}
    source = source or trainers[0].site
    if source not in by_site:
        raise ValueError(f"unknown site {source!r}; sites: {list(by_site)}")
    src = by_site[source]
    for r in range(config.rounds):
        src.train_round(r)
        if log:
            dice = src.evaluate("validation", surface=False)["dice"]
            log(f"round {r + 1}/{config.rounds}: {source} val dice {dice:.3f}")
    state = src.model.state_dict()
    dice = {}
    for t in trainers:
        t.model.load_state_dict(state)
        dice[t.site] = t.evaluate("testing", surface=False)["dice"]
    return {"trained_on": source, "test_dice": dice}
