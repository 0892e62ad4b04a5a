"""Server-side maths, without FLARE: average the shared parameters, bank the heads.

The FLARE aggregator (:mod:`lcfed.runtime.fl.aggregator`) and the in-process federation used by tests and
benchmarks both call this, so the maths is written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .contract import ContractViolation, KeyContract, bank_key

__all__ = ["HeadBankAggregation", "WEIGHTINGS"]

WEIGHTINGS = ("uniform", "samples")


class HeadBankAggregation:
    """One round of aggregation.

    Shared keys are averaged (uniform 1/K as in the paper, or weighted by training samples); personal
    keys never enter the average; banked keys (the heads) are kept per site and sent back to every
    site under ``head_bank/<site>/<key>``. Sites that did not report this round keep their last head
    in the bank (stale) unless ``drop_stale_heads``.

    A round in which every site sent only its head (LC-Fed's staged HC rounds: the network is frozen)
    keeps the global shared model unchanged: ``previous`` if given, else this object's last result. A
    round in which some sites sent the shared model and others only their head is refused: the sites
    disagree about the phase of the run, and averaging over a subset would be silently wrong.

    Args:
        contract: the algorithm's personal-key contract.
        expected_keys: every key of the site model (the contract decides which of them may arrive).
        weighting: "uniform" or "samples".
        drop_stale_heads: forget a site's head when it does not report in a round.
        allow_missing_shared: accept results without some shared keys (removed by a privacy filter such
            as ``ExcludeVars``); such a key is averaged over the sites that sent it, and keeps its previous
            global value when no site did.
    """

    def __init__(
        self,
        contract: KeyContract,
        expected_keys: Iterable[str],
        weighting: str = "uniform",
        drop_stale_heads: bool = False,
        allow_missing_shared: bool = False,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.contract = contract
        self.model_keys = list(expected_keys)
        self.expected = set(contract.outgoing_keys(self.model_keys))
        self.shared = contract.shared_keys(self.model_keys)
        self.weighting = weighting
        self.drop_stale_heads = drop_stale_heads
        self.allow_missing_shared = allow_missing_shared
        self.head_bank: dict[str, dict[str, np.ndarray]] = {}
        # the last aggregated shared model: what a head-only round keeps when the caller passes no previous
        self._last_shared: dict[str, np.ndarray] | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new round (the head bank persists across rounds)."""
        self._results: dict[str, tuple[dict[str, np.ndarray], float]] = {}

    @property
    def n_results(self) -> int:
        return len(self._results)

    def accept(self, site: str, params: Mapping[str, Any], n_samples: float | None = None) -> None:
        """Check one site's result against the contract and keep it for this round."""
        if not site or site == "unknown":
            raise ContractViolation("a result arrived without the name of the site that sent it")
        if site in self._results:
            raise ContractViolation(f"site {site!r} sent two results in one round")
        self.contract.check_outgoing(params.keys(), self.model_keys, site, self.allow_missing_shared, head_only=None)
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:
            raise ContractViolation(f"site {site!r} sent non-finite values in {bad[:5]}")
        weight = 1.0 if self.weighting == "uniform" else float(n_samples or 0)
        if weight <= 0:
            raise ContractViolation(f"site {site!r} reported no training samples; cannot weight its update")
        self._results[site] = (arrays, weight)

    def result(self, previous: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """The averaged shared parameters plus the head bank. Raises when no result arrived.

        ``previous`` (the global model sent this round) fills shared keys that no site sent, and is the
        whole shared model of a head-only round (default: the last result of this object).
        """
        if not self._results:
            raise RuntimeError("no client result arrived this round: nothing to aggregate")
        sites = sorted(self._results)  # fixed order: the same inputs give bit-identical averages
        head_only = [s for s in sites if self.contract.banked and self.contract.is_head_only(self._results[s][0])]
        if head_only and len(head_only) < len(sites):
            full = sorted(set(sites) - set(head_only))
            raise ContractViolation(
                f"sites {head_only} sent only their head while {full} sent the shared model in the same round: "
                "the sites disagree about whether the network is frozen (different hc_rounds/rounds options?)"
            )
        if head_only:
            previous = previous if previous is not None else self._last_shared
            if previous is None or any(k not in previous for k in self.shared):
                raise RuntimeError(
                    "every site sent only its head this round, and there is no previous global shared model to keep"
                )
        out: dict[str, np.ndarray] = {}
        for key in self.shared:
            senders = [s for s in sites if key in self._results[s][0]]
            if not senders:
                if previous is None or key not in previous:
                    raise RuntimeError(f"no site sent shared parameter {key!r} and there is no previous value")
                out[key] = np.asarray(previous[key], dtype=np.float32)
                continue
            total = sum(self._results[s][1] for s in senders)
            acc = np.zeros_like(self._results[senders[0]][0][key], dtype=np.float64)
            for s in senders:
                arrays, w = self._results[s]
                acc += arrays[key].astype(np.float64) * (w / total)
            out[key] = acc.astype(np.float32)
        self._last_shared = {k: out[k] for k in self.shared}
        if self.drop_stale_heads:
            self.head_bank = {}
        for s in sites:
            arrays, _ = self._results[s]
            head = {k: v for k, v in arrays.items() if self.contract.is_banked(k)}
            if head:
                self.head_bank[s] = head
        for s in sorted(self.head_bank):
            for k, v in self.head_bank[s].items():
                out[bank_key(s, k)] = v
        return out
