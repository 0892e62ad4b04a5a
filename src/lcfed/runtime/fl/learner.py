"""FLARE Learner: a thin adapter from FLARE's train task to :class:`lcfed.runtime.trainer.SiteTrainer`.

Per round it merges the received shared weights and head bank into the site's model (personal
tensors untouched), trains, validates, keeps the site's personalized checkpoints (best on the
validation split, and last) in the site's own workspace, and returns exactly the contract's outgoing
keys (shared parameters + this site's head) with the step count and scalar metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.learner_spec import Learner
from nvflare.app_common.app_constant import AppConstants, ValidateType

from ..algorithms import get_algorithm
from ..bundle import check_bundle_version
from ..config import make_config
from ..contract import bank_key
from ..data.layout import write_json_atomic
from ..data.pipeline import load_site
from ..trainer import CheckpointMismatch, SiteTrainer
from .site_config import models_root, resolve_site_data

__all__ = ["LCFedLearner", "BEST", "LAST", "HISTORY"]

BEST = "best.pt"
LAST = "last.pt"
PREVIOUS = "previous.pt"
HISTORY = "history.json"


class LCFedLearner(Learner):
    """Runs one site of an LC-Fed (or baseline) federation.

    Args:
        algorithm: registry name (``lcfed``, ``fedavg``, ...).
        sites: the ordered site list of the federation; a site's index in it is its one-hot index.
        preset: ``paper``, ``demo`` or ``tiny``.
        options: overrides of the preset (``rounds``, ``iterations``, ``seed`` ...).
        in_channels: image channels the job's model expects (checked against the site's data).
        n_classes: output classes the job's model expects (checked against the site's data).
        data_root: fallback data location (normally empty; sites configure their own, see
            :mod:`lcfed.runtime.fl.site_config`).
        num_threads: torch CPU threads for this site's process (0 leaves torch's default).
        tb_writer_id: id of the client's TBWriter component ("" to disable TensorBoard).
        run_name: names the site's model folder ``<models root>/<run_name>/`` (the job name).
        resume: continue from the site's last checkpoint of an earlier job with the same ``run_name``
            (model, personal layers, optimizer, head bank, round); without it an earlier run's files are
            moved to ``previous/`` and training starts fresh. A restart within the same job always resumes.
        send_diffs: send differences (``WEIGHT_DIFF``) instead of weights, so that FLARE's diff-based
            privacy filters can be added to the job (the aggregator rebuilds the weights).
        bundle_version: the bundle version the job was exported with; a site with another installed version
            refuses the job (see :mod:`lcfed.runtime.bundle`).
    """

    # exported to the job config even when equal to the default (FLARE drops defaults otherwise)
    _always_serialize_args = (
        "algorithm",
        "sites",
        "preset",
        "options",
        "in_channels",
        "n_classes",
        "run_name",
        "bundle_version",
    )

    def __init__(
        self,
        algorithm: str = "lcfed",
        sites: list[str] | None = None,
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        in_channels: int = 1,
        n_classes: int = 1,
        data_root: str = "",
        num_threads: int = 0,
        tb_writer_id: str = "tb_writer",
        run_name: str = "lcfed",
        resume: bool = False,
        send_diffs: bool = False,
        bundle_version: str = "",
    ):
        super().__init__()
        self.bundle_version = bundle_version
        self.run_name = run_name
        self.resume = resume
        self.send_diffs = send_diffs
        self.initial_state: dict[str, np.ndarray] = {}
        self.algorithm = algorithm
        self.sites = sites
        self.preset = preset
        self.options = options
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.data_root = data_root
        self.num_threads = num_threads
        self.tb_writer_id = tb_writer_id
        self.trainer: SiteTrainer | None = None
        self.writer = None
        self.site = ""
        self.ckpt_dir: Path | None = None
        self.job_id = ""
        self.best_dice = -1.0
        self.history: list[dict[str, Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def initialize(self, parts: dict, fl_ctx: FLContext) -> None:
        self.site = fl_ctx.get_identity_name()
        check_bundle_version(self.bundle_version, f"site {self.site!r}")
        sites = list(self.sites or [])
        if not sites:
            raise ValueError("the job lists no sites (LCFedLearner.sites is empty)")
        if self.site not in sites:
            raise ValueError(
                f"site {self.site!r} is not in the job's site list {sites}: add it to the job (the order of the list "
                "fixes each site's one-hot index) or start the client under one of these names"
            )
        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)
        config = make_config(self.preset, **(self.options or {}))
        algorithm = get_algorithm(self.algorithm)
        workspace = fl_ctx.get_engine().get_workspace()
        location = resolve_site_data(self.site, workspace.get_root_dir(), self.data_root)
        self.log_info(fl_ctx, f"site {self.site}: data from {location.site_dir} ({location.source})")
        data = load_site(location.data_root, self.site, config.size, site_dir=location.site_dir)
        if data.info.channels != self.in_channels or data.info.n_classes != self.n_classes:
            raise ValueError(
                f"site {self.site!r}: the job's model takes {self.in_channels} channel(s) and predicts "
                f"{self.n_classes} class(es), but the site's data ({location.data_root}/dataset.json) has "
                f"{data.info.channels} channel(s) and classes {list(data.info.labels)}"
            )
        self.trainer = SiteTrainer(algorithm, config, data, sites, self.site)
        # the seeded initial model (the server's reference model is the same): base of a head's first difference
        self.initial_state = {k: v.detach().cpu().numpy().copy() for k, v in self.trainer.model.state_dict().items()}
        self.job_id = fl_ctx.get_job_id()
        self.ckpt_dir = models_root(self.site, workspace.get_root_dir()) / self.run_name
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._resume_or_archive(fl_ctx)
        if self.tb_writer_id:
            self.writer = parts.get(self.tb_writer_id)
        split_sizes = {k: len(v) for k, v in data.splits.items()}
        self.log_info(
            fl_ctx,
            f"site {self.site}: {algorithm.description}, preset {config.preset}, device {self.trainer.device}, "
            f"slices {split_sizes}, personal checkpoints in {self.ckpt_dir}",
        )

    def _resume_or_archive(self, fl_ctx: FLContext) -> None:
        last = self.ckpt_dir / LAST
        if not last.is_file():
            return
        previous_job = torch.load(last, map_location="cpu", weights_only=True).get("meta", {}).get("job_id")
        if previous_job == self.job_id or self.resume:
            # the same job restarted (a killed process, a simulator client swapped out) or an explicit resume:
            # continue from this site's own personalized state; a checkpoint of another configuration fails here
            meta = self.trainer.load(last)
            self.history = list(self.trainer.history)
            self.best_dice = max((h["val_dice"] for h in self.history if "val_dice" in h), default=-1.0)
            self.log_info(
                fl_ctx, f"site {self.site}: resumed from {last} (round {meta.get('round')}, job {previous_job})"
            )
            return
        # an earlier run under the same name: keep it, never overwrite it
        archive = self.ckpt_dir / "previous" / f"{time.strftime('%Y%m%d-%H%M%S')}-{previous_job}"
        archive.mkdir(parents=True, exist_ok=True)
        for f in list(self.ckpt_dir.iterdir()):
            if f.is_file():
                shutil.move(str(f), archive / f.name)
        self.log_info(fl_ctx, f"site {self.site}: an earlier run's models were moved to {archive}")

    def _save(self, name: str, **meta: Any) -> None:
        self.trainer.save(self.ckpt_dir / name, job_id=self.job_id, **meta)

    # -- tasks -------------------------------------------------------------------------------------
    def train(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        trainer = self.trainer
        dxo = from_shareable(data)
        round_idx = int(data.get_header(AppConstants.CURRENT_ROUND, trainer.round))
        total = trainer.config.rounds  # the run's rounds (a resumed job runs only the rest)
        self._align_with_server(round_idx, fl_ctx)
        trainer.receive(dxo.data, round_idx)
        base = self._difference_base(dxo.data) if self.send_diffs else None
        evaluated = None
        if not trainer.algorithm.personalized and round_idx > 0:
            # FedAvg/FedProx: the site's model is the global one; what arrived is round r-1's aggregate
            evaluated = self._validate(round_idx - 1, total, fl_ctx, "global model")
        stats = trainer.train_round(round_idx, should_stop=lambda: abort_signal.triggered)
        if stats["aborted"]:
            return make_reply(ReturnCode.TASK_ABORTED)
        self._entry(round_idx).update(stats, total_rounds=total)
        if trainer.algorithm.personalized:
            evaluated = self._validate(round_idx, total, fl_ctx, "personalized model")
        if (self.ckpt_dir / LAST).is_file():
            # one round back, for a server that resumes from the round before this one (crash mid-round)
            shutil.copy2(self.ckpt_dir / LAST, self.ckpt_dir / PREVIOUS)
        self._save(LAST, round=round_idx)
        self._flush_history()
        losses = ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.endswith(("loss", "contrastive", "proximal")))
        self.log_info(
            fl_ctx, f"site {self.site} round {round_idx + 1}/{total}: {losses}; train {stats['train_time']:.1f} s"
        )
        self._tensorboard(stats, round_idx)
        meta = {
            MetaKey.NUM_STEPS_CURRENT_ROUND: int(stats["steps"]),
            "n_train": trainer.data.n_train,
        }
        if evaluated is not None:
            # a dict, never a bare float: FLARE 2.9 drops results whose INITIAL_METRICS is a float
            meta[MetaKey.INITIAL_METRICS] = {"val_dice": float(evaluated["dice"])}
        outgoing = trainer.outgoing()
        if base is not None:
            # differences, so FLARE's diff-based privacy filters (PercentilePrivacy, SVTPrivacy) apply
            outgoing = {k: v - base[k] for k, v in outgoing.items()}
        kind = DataKind.WEIGHT_DIFF if base is not None else DataKind.WEIGHTS
        reply = DXO(data_kind=kind, data=outgoing, meta=meta).to_shareable()
        reply.set_header(AppConstants.CURRENT_ROUND, round_idx)  # lets the outgoing audit name the round
        return reply

    def _difference_base(self, received: dict[str, Any]) -> dict[str, np.ndarray]:
        """What the server adds a difference to: the global it sent, and this site's banked (or initial) head."""
        contract = self.trainer.contract
        base = {k: np.asarray(v, dtype=np.float32) for k, v in received.items() if contract.is_shared(k)}
        for key in contract.banked_keys(self.trainer.model_keys()):
            banked = received.get(bank_key(self.site, key))
            base[key] = np.asarray(banked if banked is not None else self.initial_state[key], dtype=np.float32)
        return base

    def _align_with_server(self, round_idx: int, fl_ctx: FLContext) -> None:
        """A resumed server may restart the round this site already trained: step back one checkpoint."""
        trainer = self.trainer
        if trainer.round <= round_idx:
            if trainer.round < round_idx and trainer.round > 0:
                self.log_info(
                    fl_ctx, f"site {self.site} rejoins at round {round_idx + 1} (last trained {trainer.round})"
                )
            return
        previous = self.ckpt_dir / PREVIOUS
        if previous.is_file():
            state = torch.load(previous, map_location="cpu", weights_only=True)
            if int(state["round"]) == round_idx:
                trainer.load_state_dict(state, source=str(previous))
                self.history = [h for h in trainer.history if h["round"] < round_idx]
                self.best_dice = max((h["val_dice"] for h in self.history if "val_dice" in h), default=-1.0)
                self.log_info(
                    fl_ctx, f"site {self.site}: server restarts round {round_idx + 1}; stepped back to {previous}"
                )
                return
        raise CheckpointMismatch(
            f"site {self.site!r} has trained up to round {trainer.round} but the server asks for round "
            f"{round_idx + 1}, and no checkpoint of round {round_idx} is kept in {self.ckpt_dir}"
        )

    def validate(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if data.get_header(AppConstants.VALIDATE_TYPE) == ValidateType.BEFORE_TRAIN_VALIDATE:
            # validation runs inside train(): on the personalized model after training, or on the global
            # model as received
            return make_reply(ReturnCode.TASK_UNSUPPORTED)
        trainer = self.trainer
        total = int(data.get_header(AppConstants.NUM_ROUNDS, trainer.config.rounds))
        if not trainer.algorithm.personalized:
            # the final aggregate (sent after the last round by SiteListFedAvg): evaluate and keep it if best
            trainer.receive(from_shareable(data).data)
            val = self._validate(trainer.round - 1, total, fl_ctx, "final global model")
            self._flush_history()
        else:
            val = trainer.evaluate("validation", surface=False)
            self.log_info(fl_ctx, f"site {self.site}: final personalized model, val dice {val['dice']:.4f}")
        return DXO(data_kind=DataKind.METRICS, data={"val_dice": val["dice"], "val_iou": val["iou"]}).to_shareable()

    def _entry(self, round_idx: int) -> dict[str, Any]:
        for h in self.history:
            if h["round"] == round_idx:
                return h
        self.history.append({"round": round_idx})
        self.history.sort(key=lambda h: h["round"])
        return self._entry(round_idx)

    def _validate(self, round_idx: int, total: int, fl_ctx: FLContext, what: str) -> dict[str, Any]:
        """Validate the site's current model as round ``round_idx``'s; keep it as best.pt if it is the best."""
        t0 = time.perf_counter()
        val = self.trainer.evaluate("validation", surface=False)
        self._entry(round_idx).update(val_dice=val["dice"], val_iou=val["iou"], val_time=time.perf_counter() - t0)
        self.trainer.history = self.history
        improved = val["dice"] > self.best_dice
        if improved:
            self.best_dice = val["dice"]
            self._save(BEST, round=round_idx, val_dice=val["dice"])
        self.log_info(
            fl_ctx,
            f"site {self.site} round {round_idx + 1}/{total}: {what} val dice {val['dice']:.4f}"
            + (" (best)" if improved else ""),
        )
        self._tensorboard({"val_dice": val["dice"], "val_iou": val["iou"]}, round_idx)
        return val

    def _flush_history(self) -> None:
        self.trainer.history = self.history
        write_json_atomic(self.ckpt_dir / HISTORY, self.history)

    def finalize(self, fl_ctx: FLContext) -> None:
        if self.ckpt_dir is not None and self.history:
            summary = {"site": self.site, "best_val_dice": self.best_dice, "rounds": len(self.history)}
            write_json_atomic(self.ckpt_dir / "summary.json", summary)

    # -- helpers -----------------------------------------------------------------------------------
    def _tensorboard(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key in ("round", "total_rounds", "aborted", "steps") or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)


def read_history(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A site's per-round record (written by the learner each round)."""
    path = Path(ckpt_dir) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []
