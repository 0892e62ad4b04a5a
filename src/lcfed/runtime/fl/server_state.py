"""The server's persistent state of a run: shared model, head bank, round record -- kept across jobs.

FLARE's per-job server folder holds ``FL_global_model.pt`` of that job. To resume a stopped run in a
new job, the server also keeps ``<server workspace>/lcfed_models/<run name>/``:
``global_state.pt`` (last aggregated round, shared weights, head bank, the run's identity) and
``lcfed_rounds.json`` (the per-round record). A new run under the same name moves an earlier run's
files to ``previous/`` instead of overwriting them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.fl_context import FLContext

from ..config import make_config
from ..site_round import archive_files
from ..trainer import atomic_torch_save
from .site_config import models_root

__all__ = ["STATE_FILE", "state_dir", "run_identity", "save_state", "load_state", "archive_run", "ResumeError"]

STATE_FILE = "global_state.pt"


class ResumeError(RuntimeError):
    """A resume was asked for but there is nothing (compatible) to resume."""


def state_dir(fl_ctx: FLContext, run_name: str) -> Path:
    root = fl_ctx.get_engine().get_workspace().get_root_dir()
    return models_root("server", root) / run_name


def run_identity(
    algorithm: str,
    sites: list[str] | None,
    preset: str,
    options: dict[str, Any] | None,
    in_channels: int,
    n_classes: int,
) -> dict[str, Any]:
    """What a saved server state must match to be resumed (the number of rounds may change)."""
    cfg = make_config(preset, **(options or {}))
    return {
        "algorithm": algorithm,
        "sites": list(sites or []),
        "in_channels": in_channels,
        "n_classes": n_classes,
        "width": cfg.width,
        "seed": cfg.seed,
    }


def save_state(directory: Path, round_idx: int | None, params: dict[str, Any], identity: dict[str, Any]) -> None:
    state = {
        "round": round_idx,
        "identity": identity,
        "params": {k: torch.as_tensor(v).clone() for k, v in params.items()},
        "saved_at": time.time(),
    }
    atomic_torch_save(state, directory / STATE_FILE)


def load_state(directory: Path, identity: dict[str, Any]) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"resume asked for, but no saved server state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    diffs = [
        f"{k}: saved {state['identity'].get(k)!r} vs job {v!r}"
        for k, v in identity.items()
        if state["identity"].get(k) != v
    ]
    if diffs:
        raise ResumeError(f"the saved server state {path} is from another configuration: " + "; ".join(diffs))
    return state


def archive_run(directory: Path) -> Path | None:
    """Move an earlier run's files to ``previous/<timestamp>/`` (the same rule as a site's checkpoints)."""
    return archive_files(directory)
