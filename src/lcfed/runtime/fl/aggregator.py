"""FLARE aggregator: averages the shared parameters, keeps every site's head in the head bank.

A ``ModelAggregator``, so it plugs into the ``FedAvg`` controller (and ``ScatterAndGather``). The maths
is :class:`lcfed.runtime.aggregation.HeadBankAggregation`; this class adds FLARE's types, the per-round log
and a server-side record of what each site reported (``lcfed_rounds.json`` in the server's app folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import MetaKey
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AppConstants

from ..aggregation import HeadBankAggregation
from ..contract import ContractViolation, split_bank_key
from ..data.layout import write_json_atomic
from .reference import MODEL_ARGS, reference_model
from .server_state import load_state, run_identity, state_dir

__all__ = ["HeadBankAggregator", "ROUNDS_FILE"]

ROUNDS_FILE = "lcfed_rounds.json"


def _peak_rss_mb() -> float | None:
    """Peak resident memory of the server process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class HeadBankAggregator(ModelAggregator):
    """Average shared keys (uniform or sample-weighted), bank heads per site, reject contract breaches.

    Args:
        algorithm: registry name; its key contract decides what is averaged, banked or refused.
        sites: the job's ordered site list.
        preset: preset name (fixes the model width).
        options: preset overrides.
        in_channels: image channels of the model.
        n_classes: output classes of the model.
        weighting: "uniform" (the paper) or "samples" (by each site's training samples).
        drop_stale_heads: forget the head of a site that did not report in a round (default: keep it).
        allow_missing_shared: accept results from which a privacy filter removed shared keys.
        min_clients: results a round needs (0: every site); fewer fail the run, naming the missing sites.
        run_name: the run's folder name on the server (the job name).
        resume: continue the saved run (head bank, round record) -- see the persistor.

    Results may come as weights or as differences (``WEIGHT_DIFF``, when the job sends differences so
    that FLARE's diff-based privacy filters apply): a shared key's difference is taken against the
    global model sent this round, a head's against the site's head in the bank sent this round (its
    initial head before it is banked).
    """

    # exported to the job config even when equal to the default (FLARE drops defaults otherwise)
    _always_serialize_args = MODEL_ARGS + ("weighting", "run_name")

    def __init__(
        self,
        algorithm: str = "lcfed",
        sites: list[str] | None = None,
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        in_channels: int = 1,
        n_classes: int = 1,
        weighting: str = "uniform",
        drop_stale_heads: bool = False,
        allow_missing_shared: bool = False,
        run_name: str = "lcfed",
        resume: bool = False,
        min_clients: int = 0,
    ):
        super().__init__()
        self.min_clients = min_clients
        self.allow_missing_shared = allow_missing_shared
        self.run_name = run_name
        self.resume = resume
        self._restored = False
        self.algorithm = algorithm
        self.sites = sites
        self.preset = preset
        self.options = options
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.weighting = weighting
        self.drop_stale_heads = drop_stale_heads
        algo, model, _ = reference_model(algorithm, sites, preset, options, in_channels, n_classes)
        self.maths = HeadBankAggregation(
            algo.contract, model.state_dict().keys(), weighting, drop_stale_heads, allow_missing_shared
        )
        self.identity = run_identity(algorithm, sites, preset, options, in_channels, n_classes)
        state = model.state_dict()
        self._initial_heads = {k: state[k].detach().cpu().numpy() for k in algo.contract.banked_keys(state)}
        # Local training sends no parameters: its (empty) results still count as arrived
        self.accepts_empty_results = algo.contract.shares_nothing
        self.final_validation: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}
        # the initial global model is this seeded reference model's shared part (see the persistor)
        self._previous_shared = {
            k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k in set(self.maths.shared)
        }
        self._t0 = time.perf_counter()
        self._writers: dict[str, Any] = {}

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self._restore(fl_ctx)
        elif event_type == EventType.END_RUN:
            for writer in self._writers.values():
                writer.close()

    def _restore(self, fl_ctx: FLContext | None) -> None:
        """Continue a saved run: the head bank, the last global shared model and the round record."""
        if not self.resume or self._restored or fl_ctx is None:
            return
        self._restored = True
        directory = state_dir(fl_ctx, self.run_name)
        state = load_state(directory, self.identity)
        params = {k: v.numpy() for k, v in state["params"].items()}
        bank: dict[str, dict[str, np.ndarray]] = {}
        for key, value in params.items():
            parsed = split_bank_key(key)
            if parsed:
                bank.setdefault(parsed[0], {})[parsed[1]] = value
        self.maths.head_bank = bank
        self._previous_shared = {k: params[k] for k in self.maths.shared if k in params}
        record = directory / ROUNDS_FILE
        if record.is_file():
            saved = json.loads(record.read_text())
            self.rounds = [
                r for r in saved.get("rounds", []) if r.get("round") is not None and r["round"] <= state["round"]
            ]
        self.log_info(fl_ctx, f"resumed aggregation after round {state['round']}: head bank {sorted(bank)}")

    def reset_stats(self) -> None:
        self._restore(self.fl_ctx)
        self.maths.reset()
        self._round = {"sites": {}}
        self._t0 = time.perf_counter()

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "")
        if self.sites and site not in self.sites:
            raise ValueError(f"result from site {site!r}, which is not in the job's site list {self.sites}")
        params = model.params or {}
        if model.params_type == ParamsType.DIFF:
            params = self._from_differences(site, params)
        self.maths.accept(site, params, n_samples=meta.get("n_train"))
        metrics = model.metrics if isinstance(model.metrics, dict) else {}
        self._round["sites"][site] = {
            "val_dice": float(metrics.get("val_dice", float("nan"))),
            "steps": int(meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 0) or 0),
            "n_keys": len(params),
            "n_values": int(sum(np.asarray(v).size for v in params.values())),
        }
        self.info(f"accepted {len(params)} tensors from {site} ({self.maths.n_results} this round)")

    def _from_differences(self, site: str, diffs: dict[str, Any]) -> dict[str, np.ndarray]:
        own_head = self.maths.head_bank.get(site, self._initial_heads)
        out = {}
        for key, diff in diffs.items():
            if self.maths.contract.is_banked(key):
                base = own_head.get(key, self._initial_heads.get(key))
            else:
                base = self._previous_shared.get(key)
            if base is None:
                raise ContractViolation(f"site {site!r} sent a difference for {key!r}, which has no base value")
            out[key] = np.asarray(base, dtype=np.float32) + np.asarray(diff, dtype=np.float32)
        return out

    def aggregate_model(self) -> FLModel:
        required = self.min_clients or len(self.sites or []) or 1
        if self.maths.n_results < required:
            arrived = sorted(self._round.get("sites", {}))
            missing = sorted(set(self.sites or []) - set(arrived))
            raise RuntimeError(
                f"only {len(arrived)} site(s) {arrived} returned a result this round; the job needs {required} "
                f"(min_clients); missing: {missing}"
            )
        # raises when nothing arrived: an empty round never passes silently
        params = self.maths.result(previous=self._previous_shared)
        round_idx = self.fl_ctx.get_prop(AppConstants.CURRENT_ROUND) if self.fl_ctx else None
        dices = {s: v["val_dice"] for s, v in self._round["sites"].items()}
        known = [d for d in dices.values() if not np.isnan(d)]  # nan: a site did not validate this round
        mean_dice = float(np.mean(known)) if known else float("nan")
        # how far the global shared model moved this round (0 would mean nobody trained)
        shared = {k: params[k] for k in self.maths.shared}
        delta = float(np.sqrt(sum(float(((shared[k] - self._previous_shared[k]) ** 2).sum()) for k in shared)))
        self._previous_shared = shared
        self._round.update(
            {
                "round": round_idx,
                "mean_val_dice": mean_dice,
                "n_shared_keys": len(shared),
                "n_bank_keys": len(params) - len(shared),
                "shared_change": delta,
                "time": time.perf_counter() - self._t0,
                "server_peak_rss_mb": _peak_rss_mb(),
            }
        )
        self.rounds.append(self._round)
        missing = sorted(set(self.sites or []) - set(dices))
        self.info(
            f"round {round_idx}: aggregated {len(dices)} site(s) "
            f"({', '.join(f'{s} {d:.4f}' for s, d in sorted(dices.items()))}); mean val dice {mean_dice:.4f}; "
            f"head bank {sorted({k.split('/')[1] for k in params if k.startswith('head_bank/')})}"
            + (f"; missing {missing}" if missing else "")
        )
        self._write_record()
        self._tensorboard(round_idx, dices, mean_dice)
        return FLModel(params_type=ParamsType.FULL, params=params, metrics={"val_dice": mean_dice})

    def _tensorboard(self, round_idx: int | None, dices: dict[str, float], mean_dice: float) -> None:
        """The validation Dice each site reported, as TensorBoard events in ``<job run folder>/tb_events/<site>``."""
        if not self.fl_ctx or round_idx is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        app_dir = Path(self.fl_ctx.get_engine().get_workspace().get_app_dir(self.fl_ctx.get_job_id()))
        for name, value in [*dices.items(), ("mean", mean_dice)]:
            if np.isnan(value):
                continue
            if name not in self._writers:
                self._writers[name] = SummaryWriter(log_dir=str(app_dir.parent / "tb_events" / name))
            self._writers[name].add_scalar("val_dice", value, global_step=int(round_idx))
            self._writers[name].flush()

    def record_final_validation(self, scores: dict[str, Any]) -> None:
        """Validation Dice per site of the final model (called by the controller after the last round)."""
        self.final_validation = dict(scores)
        self._write_record()

    def _write_record(self) -> None:
        if not self.fl_ctx:
            return
        engine = self.fl_ctx.get_engine()
        app_dir = Path(engine.get_workspace().get_app_dir(self.fl_ctx.get_job_id()))
        record = {
            "algorithm": self.algorithm,
            "sites": self.sites,
            "rounds": self.rounds,
            "final_validation": self.final_validation,
        }
        write_json_atomic(app_dir / ROUNDS_FILE, record)
        write_json_atomic(state_dir(self.fl_ctx, self.run_name) / ROUNDS_FILE, record)
