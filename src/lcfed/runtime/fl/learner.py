"""FLARE Learner: FLARE's types in, the site's round (:class:`lcfed.runtime.site_round.SiteRound`), FLARE's types out.

The round itself (merge the received shared weights and head bank, evaluate, train, evaluate, keep the
personalized checkpoints, return exactly the contract's outgoing keys) is the same code the in-process
federation runs. This adapter adds what only FLARE has: the task headers, the abort signal, differences
for FLARE's privacy filters, TensorBoard through FLARE's analytics, and the refusal a site sends when it
cannot take part (another bundle version, unreadable data), which the server turns into a failed run
naming the site.
"""

from __future__ import annotations

import json
import os
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
from ..bundle import BundleVersionMismatch, check_bundle_version
from ..config import make_config
from ..contract import bank_key
from ..data.layout import DataError
from ..data.pipeline import load_site
from ..site_round import BEST, HISTORY, LAST, CheckpointStore, SiteRound
from ..trainer import CheckpointMismatch, SiteTrainer
from .controller import REFUSAL_HEADER
from .reference import MODEL_ARGS
from .site_config import models_root, resolve_site_data

__all__ = ["LCFedLearner", "BEST", "LAST", "HISTORY", "read_history"]


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
        tensorboard: write TensorBoard events of this site's training (losses, times, validation) into its
            own models folder (``<models>/<run_name>/tensorboard``); they never leave the site.
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
    _always_serialize_args = MODEL_ARGS + ("run_name", "bundle_version")

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
        tensorboard: bool = True,
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
        self.tensorboard = tensorboard
        self.trainer: SiteTrainer | None = None
        self.round: SiteRound | None = None
        self.writer = None
        self.site = ""
        self.refusal = ""  # why this site refuses the job ("" when it takes part)
        self.refusal_error: Exception | None = None
        self._fl_ctx: FLContext | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def initialize(self, parts: dict, fl_ctx: FLContext) -> None:
        self.site = fl_ctx.get_identity_name()
        self._fl_ctx = fl_ctx
        try:
            check_bundle_version(self.bundle_version, f"site {self.site!r}")
            self._initialize(parts, fl_ctx)
        except (BundleVersionMismatch, DataError, CheckpointMismatch, ValueError) as e:
            # refuse every task with the reason, so that the server stops the run naming this site and why
            # (an exception here would reach the server only as an anonymous EXECUTION_EXCEPTION)
            self.refusal_error = e
            self.refusal = f"{type(e).__name__}: {e}"
            self.log_error(fl_ctx, f"site {self.site} refuses the job: {self.refusal}")

    def _initialize(self, parts: dict, fl_ctx: FLContext) -> None:
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
        store = CheckpointStore(models_root(self.site, workspace.get_root_dir()) / self.run_name, fl_ctx.get_job_id())
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(store.directory / "tensorboard"))
        self.round = SiteRound(self.trainer, store, log=self._log, on_metrics=self._tensorboard)
        self.round.start(resume=self.resume)
        split_sizes = {k: len(v) for k, v in data.splits.items()}
        self.log_info(
            fl_ctx,
            f"site {self.site}: {algorithm.description}, preset {config.preset}, device {self.trainer.device}, "
            f"slices {split_sizes}, personal checkpoints in {store.directory}",
        )

    # -- tasks -------------------------------------------------------------------------------------
    def train(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.refusal:
            return self._refuse()
        self._fl_ctx = fl_ctx
        dxo = from_shareable(data)
        round_idx = int(data.get_header(AppConstants.CURRENT_ROUND, self.trainer.round))
        base = None
        if self.send_diffs:
            self.round.align(round_idx)  # the base is the state this round starts from
            base = self._difference_base(dxo.data)
        # the run's rounds, staged HC rounds included (a resumed job runs only the rest)
        reply = self.round.run(dxo.data, round_idx, self.trainer.total_rounds, lambda: abort_signal.triggered)
        if reply is None:
            return make_reply(ReturnCode.TASK_ABORTED)
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: reply["steps"], "n_train": reply["n_train"]}
        if reply["val_dice"] is not None:
            # a dict, never a bare float: FLARE 2.9 drops results whose INITIAL_METRICS is a float
            meta[MetaKey.INITIAL_METRICS] = {"val_dice": reply["val_dice"]}
        outgoing = reply["params"]
        if base is not None:
            # differences, so FLARE's diff-based privacy filters (PercentilePrivacy, SVTPrivacy) apply
            outgoing = {k: v - base[k] for k, v in outgoing.items()}
        kind = DataKind.WEIGHT_DIFF if base is not None else DataKind.WEIGHTS
        out = DXO(data_kind=kind, data=outgoing, meta=meta).to_shareable()
        out.set_header(AppConstants.CURRENT_ROUND, round_idx)  # lets the outgoing audit name the round
        return out

    def _refuse(self) -> Shareable:
        reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply.set_header(REFUSAL_HEADER, self.refusal)
        return reply

    def _difference_base(self, received: dict[str, Any]) -> dict[str, np.ndarray]:
        """What the server adds a difference to: the global it sent, and this site's banked (or initial) head."""
        contract = self.trainer.contract
        base = {k: np.asarray(v, dtype=np.float32) for k, v in received.items() if contract.is_shared(k)}
        for key in contract.banked_keys(self.trainer.model_keys()):
            banked = received.get(bank_key(self.site, key))
            base[key] = np.asarray(banked if banked is not None else self.initial_state[key], dtype=np.float32)
        return base

    def validate(self, data: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.refusal:
            return self._refuse()
        if data.get_header(AppConstants.VALIDATE_TYPE) == ValidateType.BEFORE_TRAIN_VALIDATE:
            # validation runs inside train(): on the personalized model after training, or on the global
            # model as received
            return make_reply(ReturnCode.TASK_UNSUPPORTED)
        self._fl_ctx = fl_ctx
        total = int(data.get_header(AppConstants.NUM_ROUNDS, self.trainer.total_rounds))
        # the final aggregate (sent after the last round by SiteListFedAvg)
        received = None if self.trainer.algorithm.personalized else from_shareable(data).data
        val = self.round.final_validation(received, total)
        return DXO(data_kind=DataKind.METRICS, data={"val_dice": val["dice"], "val_iou": val["iou"]}).to_shareable()

    def finalize(self, fl_ctx: FLContext) -> None:
        if self.round is not None:
            self.round.finish()
        if self.writer is not None:
            self.writer.close()

    # -- helpers -----------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self._fl_ctx is not None:
            self.log_info(self._fl_ctx, message)

    def _tensorboard(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in scalars.items():
            if key != "total_rounds":
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()


def read_history(ckpt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A site's per-round record (written each round)."""
    path = Path(ckpt_dir) / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []
