"""An in-process federation (no FLARE): the same site round and aggregation maths in one loop.

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
from lcfed.runtime.site_round import SiteRound
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
    rounds: int | None = None,
    weighting: str = "uniform",
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run ``rounds`` rounds (default: the algorithm's whole run, staged HC rounds included); returns
    per-round records with each site's validation Dice.

    Each site runs the same :class:`~lcfed.runtime.site_round.SiteRound` as under FLARE (without
    checkpoints on disk); this loop plays the server: it sends the global model and head bank, collects
    the replies and aggregates them with the same maths as FLARE's aggregator.
    """
    first = trainers[0]
    rounds = first.total_rounds if rounds is None else rounds
    agg = HeadBankAggregation(first.contract, first.model_keys(), weighting)
    # every site starts from the same seeded model, so the first site's shared part is the global init
    global_params: dict[str, Any] = {
        k: v.detach().cpu().numpy().copy() for k, v in first.model.state_dict().items() if first.contract.is_shared(k)
    }
    sites = [SiteRound(t) for t in trainers]
    records: list[dict[str, Any]] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        agg.reset()
        for site in sites:
            reply = site.run(global_params, r, rounds)
            agg.accept(site.site, reply["params"], n_samples=reply["n_train"])
        global_params = agg.result()
        records.append({"round": r, "time": time.perf_counter() - t0})
        if log and (first.algorithm.personalized or r > 0):
            _log_round(log, _record(sites, r if first.algorithm.personalized else r - 1), rounds)
    if not first.algorithm.personalized:
        # FLARE's SiteListFedAvg sends the final aggregate for validation; so does this loop
        for site in sites:
            site.final_validation(global_params, rounds)
        if log:
            _log_round(log, _record(sites, rounds - 1), rounds)
    # personalized sites keep their model of the last round (the last aggregate is not merged)
    for record in records:
        record.update(_record(sites, record["round"]))
    return records


def _record(sites: list[SiteRound], round_idx: int) -> dict[str, Any]:
    """Each site's record of one round (losses, steps, validation Dice), from the sites' own histories."""
    out: dict[str, Any] = {"round": round_idx, "sites": {}}
    for site in sites:
        entry = next((h for h in site.history if h["round"] == round_idx), {})
        out["sites"][site.site] = {k: v for k, v in entry.items() if k != "round"}
    return out


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
