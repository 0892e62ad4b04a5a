"""Server persistor of the global state: the shared model and the head bank (never the sites' HC)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants

from ..trainer import atomic_torch_save
from .reference import reference_model

__all__ = ["GlobalStatePersistor", "GLOBAL_MODEL_FILE"]

GLOBAL_MODEL_FILE = "FL_global_model.pt"


class GlobalStatePersistor(ModelPersistor):
    """Initial global model = the shared part of a seeded model; saves shared weights + head bank each round.

    ``PTFileModelPersistor`` cannot hold the head bank (it raises on keys its model lacks), so the
    bundle persists the global state itself.

    Args: the model arguments of the job (see :class:`lcfed.fl.aggregator.HeadBankAggregator`).
    """

    # exported to the job config even when equal to the default (FLARE drops defaults otherwise)
    _always_serialize_args = ("algorithm", "sites", "preset", "options", "in_channels", "n_classes")

    def __init__(
        self,
        algorithm: str = "lcfed",
        sites: list[str] | None = None,
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        in_channels: int = 1,
        n_classes: int = 1,
    ):
        super().__init__()
        self.algorithm = algorithm
        self.sites = sites
        self.preset = preset
        self.options = options
        self.in_channels = in_channels
        self.n_classes = n_classes

    def _path(self, fl_ctx: FLContext) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        return Path(workspace.get_app_dir(fl_ctx.get_job_id())) / GLOBAL_MODEL_FILE

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        algo, model, _ = reference_model(
            self.algorithm, self.sites, self.preset, self.options, self.in_channels, self.n_classes
        )
        shared = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if algo.contract.is_shared(k)}
        self.log_info(fl_ctx, f"initial global model: {len(shared)} shared tensors ({algo.description})")
        return make_model_learnable(weights=shared, meta_props={})

    def save_model(self, learnable: ModelLearnable, fl_ctx: FLContext) -> None:
        weights = learnable[ModelLearnableKey.WEIGHTS]
        state = {
            "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
            "algorithm": self.algorithm,
            "sites": list(self.sites or []),
            "params": {k: torch.as_tensor(v) for k, v in weights.items()},
        }
        atomic_torch_save(state, self._path(fl_ctx))

    def get_model_inventory(self, fl_ctx: FLContext) -> dict:
        return {}

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        state = torch.load(self._path(fl_ctx), map_location="cpu", weights_only=True)
        return make_model_learnable({k: v.numpy() for k, v in state["params"].items()}, {})
