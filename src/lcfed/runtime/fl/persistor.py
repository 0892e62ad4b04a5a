"""Server persistor of the global state: the shared model and the head bank (never the sites' HC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants

from ..bundle import check_bundle_version
from ..trainer import atomic_torch_save
from .reference import MODEL_ARGS, reference_model
from .server_state import archive_run, load_state, run_identity, save_state, state_dir

__all__ = ["GlobalStatePersistor", "GLOBAL_MODEL_FILE", "RESUME_ROUND"]

GLOBAL_MODEL_FILE = "FL_global_model.pt"
RESUME_ROUND = "lcfed_resume_round"  # meta key: the last round the loaded global state aggregated


class GlobalStatePersistor(ModelPersistor):
    """Initial global model = the shared part of a seeded model; saves shared weights + head bank each round.

    ``PTFileModelPersistor`` cannot hold the head bank (it raises on keys its model lacks), so the
    bundle persists the global state itself: in the job's folder (``FL_global_model.pt``) and in the
    server's run folder (:mod:`lcfed.runtime.fl.server_state`), from which ``resume=True`` continues a run.

    Args: the model arguments of the job (see :class:`lcfed.runtime.fl.aggregator.HeadBankAggregator`), plus
        run_name: the run's folder name on the server (the job name).
        resume: start from the run folder's saved state instead of a fresh model.
        bundle_version: the bundle version the job was exported with; another installed version fails the run.
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
        run_name: str = "lcfed",
        resume: bool = False,
        bundle_version: str = "",
    ):
        super().__init__()
        self.bundle_version = bundle_version
        self.algorithm = algorithm
        self.sites = sites
        self.preset = preset
        self.options = options
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.run_name = run_name
        self.resume = resume

    def _identity(self) -> dict[str, Any]:
        return run_identity(self.algorithm, self.sites, self.preset, self.options, self.in_channels, self.n_classes)

    def _path(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_app_dir(fl_ctx.get_job_id())) / GLOBAL_MODEL_FILE

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        check_bundle_version(self.bundle_version, "server")
        directory = state_dir(fl_ctx, self.run_name)
        if self.resume:
            state = load_state(directory, self._identity())
            weights = {k: v.numpy() for k, v in state["params"].items()}
            self.log_info(fl_ctx, f"resuming run {self.run_name!r} after round {state['round']} from {directory}")
            return make_model_learnable(weights=weights, meta_props={RESUME_ROUND: int(state["round"])})
        archived = archive_run(directory)
        if archived:
            self.log_info(fl_ctx, f"an earlier run {self.run_name!r} was moved to {archived}")
        algo, model, _ = reference_model(
            self.algorithm, self.sites, self.preset, self.options, self.in_channels, self.n_classes
        )
        shared = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if algo.contract.is_shared(k)}
        self.log_info(fl_ctx, f"initial global model: {len(shared)} shared tensors ({algo.description})")
        return make_model_learnable(weights=shared, meta_props={})

    def save_model(self, learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = learnable[ModelLearnableKey.WEIGHTS]
        round_idx = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        state = {
            "round": round_idx,
            "algorithm": self.algorithm,
            "sites": list(self.sites or []),
            "params": {k: torch.as_tensor(v) for k, v in weights.items()},
        }
        atomic_torch_save(state, self._path(fl_ctx))
        save_state(state_dir(fl_ctx, self.run_name), round_idx, weights, self._identity())

    def get_model_inventory(self, fl_ctx: FLContext) -> dict:
        return {}

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        state = torch.load(self._path(fl_ctx), map_location="cpu", weights_only=True)
        return make_model_learnable({k: v.numpy() for k, v in state["params"].items()}, {})
