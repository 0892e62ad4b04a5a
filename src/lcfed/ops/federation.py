"""An in-process federation (no FLARE): the same trainer and aggregation maths in one loop.

Used by the tests (the maths of a whole run in seconds), the site-effect check of the demo set and
the benchmark's overhead measurement (FLARE round vs the same local work).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lcfed.runtime.aggregation import HeadBankAggregation
from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import TrainConfig
from lcfed.runtime.data.layout import load_dataset_info
from lcfed.runtime.data.pipeline import load_site
from lcfed.runtime.trainer import SiteTrainer

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
        k: v.detach().cpu().numpy().copy() for k, v in first.model.state_dict().items() if first.contract.is_shared(k)
    }
    personalized = first.algorithm.personalized
    records: list[dict[str, Any]] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        agg.reset()
        record: dict[str, Any] = {"round": r, "sites": {}}
        records.append(record)
        for t in trainers:
            t.receive(global_params, r)
            if not personalized and r > 0:  # the site's model is the global one it just received
                records[r - 1]["sites"][t.site]["val_dice"] = t.evaluate("validation", surface=False)["dice"]
            stats = t.train_round(r)
            record["sites"][t.site] = dict(stats)
            if personalized:
                record["sites"][t.site]["val_dice"] = t.evaluate("validation", surface=False)["dice"]
            agg.accept(t.site, t.outgoing(), n_samples=t.data.n_train)
        global_params = agg.result()
        record["time"] = time.perf_counter() - t0
        if log and personalized:
            _log_round(log, record, rounds)
        elif log and r > 0:
            _log_round(log, records[r - 1], rounds)
    if not personalized:
        # FLARE's SiteListFedAvg sends the final aggregate for validation; so does this loop
        for t in trainers:
            t.receive(global_params)
            records[-1]["sites"][t.site]["val_dice"] = t.evaluate("validation", surface=False)["dice"]
        if log:
            _log_round(log, records[-1], rounds)
    # personalized sites keep their model of the last round (the last aggregate is not merged)
    return records


def _log_round(log: Callable[[str], None], record: dict[str, Any], rounds: int) -> None:
    parts = []
    for site, v in record["sites"].items():
        losses = ", ".join(f"{k} {x:.4f}" for k, x in v.items() if k.endswith(("loss", "contrastive", "proximal")))
        parts.append(f"{site}={v.get('val_dice', float('nan')):.3f} ({losses})")
    log(f"round {record['round'] + 1}/{rounds}: val dice " + "; ".join(parts))


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
