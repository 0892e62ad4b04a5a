"""The plain local trainer/evaluator of one site (no FLARE).

It runs N iterations of an algorithm on a site's data with the algorithm's own step (FedRep-style
alternation, HC schedule...), keeps Adam state per site, picks CUDA (mixed precision) or CPU by
itself and is seeded. The FLARE Learner is a thin adapter around it; the benchmark and the tests
drive it directly.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .algorithms import Algorithm, ModelSpec, Precision, SiteContext
from .config import TrainConfig
from .contract import ContractViolation, KeyContract
from .data.pipeline import SiteData

__all__ = ["select_device", "seed_everything", "SiteTrainer", "CheckpointMismatch", "atomic_torch_save"]

CHECKPOINT_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint was written by another configuration (algorithm, site list, preset...)."""


def select_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available (or as asked), else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch in one place (MONAI's set_determinism)."""
    from monai.utils import set_determinism

    set_determinism(seed=seed)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class SiteTrainer:
    """Train and evaluate one site.

    Args:
        algorithm: the method (decides personal keys and the local step).
        config: preset plus overrides.
        data: the site's loaded splits.
        sites: ordered site names of the federation (fixes the one-hot index and K).
        site: this site's name (must be in ``sites``).
        device: force a device; default CUDA when available, else CPU.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        config: TrainConfig,
        data: SiteData,
        sites: Sequence[str],
        site: str,
        device: str | torch.device | None = None,
    ):
        sites = list(sites)
        if len(set(sites)) != len(sites):
            dupes = sorted({s for s in sites if sites.count(s) > 1})
            raise ValueError(f"site list names {dupes} more than once: {sites}")
        if site not in sites:
            raise ValueError(f"site {site!r} is not in the job's site list {sites}")
        self.algorithm = algorithm
        self.config = config
        self.data = data
        self.sites = sites
        self.site = site
        self.device = select_device(device)
        spec = ModelSpec(data.info.channels, data.info.n_classes, len(sites), config.width)
        # the same seed on every site: identical initial models (the server's global init is the same too)
        seed_everything(config.seed)
        model = algorithm.build_model(spec).to(self.device)
        optimizers = {
            name: torch.optim.Adam(params, lr=algorithm.learning_rate(name, config), betas=(0.9, 0.999))
            for name, params in algorithm.param_groups(model).items()
            if params
        }
        self.ctx = SiteContext(
            model=model,
            optimizers=optimizers,
            site_index=sites.index(site),
            site_name=site,
            config=config,
            device=self.device,
            precision=Precision(self.device, config.amp),
        )
        # sampling is per site and continues across rounds (no replay of the same samples each round)
        self.generator = torch.Generator().manual_seed(config.seed * 100_003 + self.ctx.site_index)
        self._order: list[int] = []
        self.round = 0  # the next round to train
        self.history: list[dict[str, Any]] = []

    # -- federation interface ---------------------------------------------------------------------
    @property
    def contract(self) -> KeyContract:
        return self.algorithm.contract

    @property
    def model(self) -> torch.nn.Module:
        return self.ctx.model

    def model_keys(self) -> list[str]:
        return list(self.model.state_dict().keys())

    def receive(self, params: Mapping[str, Any], round_idx: int | None = None) -> None:
        """Merge the server's shared weights and head bank; personal tensors are never touched.

        With ``round_idx`` the algorithm may decline the shared weights for that round (LC-Fed's staged
        HC rounds keep the site's frozen network); the keys are checked and the head bank taken anyway.
        Raises :class:`ContractViolation` for a personal, unknown or missing shared key, and
        ``ValueError`` for a shape mismatch (a model/site-count mismatch shows up here).
        """
        used = self.ctx.head_bank.update(params) if self.algorithm.uses_head_bank else set()
        state = self.model.state_dict()
        shared: dict[str, torch.Tensor] = {}
        for key, value in params.items():
            if key in used:
                continue
            if key not in state:
                raise ContractViolation(f"site {self.site!r} received unknown parameter {key!r}")
            if self.contract.is_personal(key):
                raise ContractViolation(f"site {self.site!r} received personal parameter {key!r} from the server")
            tensor = torch.as_tensor(np.asarray(value))
            if tuple(tensor.shape) != tuple(state[key].shape):
                raise ValueError(
                    f"site {self.site!r}: global parameter {key!r} has shape {tuple(tensor.shape)}, the local model "
                    f"{tuple(state[key].shape)} (different preset, channels, classes or number of sites?)"
                )
            shared[key] = tensor
        expected = set(self.contract.shared_keys(state))
        if shared and set(shared) != expected:
            missing = sorted(expected - set(shared))
            raise ContractViolation(f"site {self.site!r} received an incomplete shared model; missing {missing[:5]}")
        if shared and (round_idx is None or self.algorithm.merges_global(self.config, round_idx)):
            self.model.load_state_dict(shared, strict=False)

    @property
    def total_rounds(self) -> int:
        """Rounds of the whole run for this algorithm (network rounds plus, e.g., staged HC rounds)."""
        return self.algorithm.total_rounds(self.config)

    def outgoing(self, round_idx: int | None = None) -> dict[str, np.ndarray]:
        """What leaves the site after ``round_idx`` (default: the last trained round), as float32 numpy arrays.

        The shared parameters plus the banked head; in the algorithm's head-only rounds (LC-Fed's staged HC,
        network frozen) the banked head alone.
        """
        r = self.round - 1 if round_idx is None else round_idx
        out = self.algorithm.outgoing_state(self.ctx, r)
        self.contract.check_outgoing(
            out, self.model_keys(), self.site, head_only=self.algorithm.head_only(self.config, r)
        )
        # copies: the arrays must not alias the live parameters that the next round updates in place
        return {k: v.detach().cpu().float().numpy().copy() for k, v in out.items()}

    # -- training ---------------------------------------------------------------------------------
    def _next_indices(self, n: int) -> list[int]:
        size = len(self.data.splits["training"])
        out: list[int] = []
        while len(out) < n:
            if not self._order:
                self._order = torch.randperm(size, generator=self.generator).tolist()
            take = min(n - len(out), len(self._order))
            out.extend(self._order[:take])
            self._order = self._order[take:]
        return out

    def train_round(
        self,
        round_idx: int | None = None,
        iterations: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Run one round of local training; returns mean losses, the number of steps and the time.

        ``should_stop`` is polled between iterations (FLARE's abort signal); the returned ``steps``
        then counts the iterations actually run and ``aborted`` is True.
        """
        r = self.round if round_idx is None else round_idx
        n_iter = self.config.iterations if iterations is None else iterations
        train = self.data.splits.get("training")
        if train is None or len(train) == 0:
            raise ValueError(f"site {self.site!r} has no training data")
        t0 = time.perf_counter()
        self.model.train()
        self.algorithm.on_round_start(self.ctx, r)
        sums: dict[str, float] = {}
        done = 0
        for it in range(n_iter):
            if should_stop is not None and should_stop():
                break
            idx = self._next_indices(self.config.batch_size)
            image = train.images[idx].to(self.device, non_blocking=True)
            label = train.labels[idx].to(self.device, non_blocking=True)
            for k, v in self.algorithm.train_step(self.ctx, image, label, it, r).items():
                sums[k] = sums.get(k, 0.0) + v
            done += 1
        aborted = done < n_iter
        if not aborted:
            self.algorithm.on_round_end(self.ctx, r, self.total_rounds)
            self.round = r + 1
        stats = {"round": r, "steps": done, "train_time": time.perf_counter() - t0, "aborted": aborted}
        stats.update({k: v / max(done, 1) for k, v in sums.items()})
        return stats

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_images(self, images: torch.Tensor) -> torch.Tensor:
        """Final probabilities (N, C, S, S) on the CPU of preprocessed slices (N, channels, S, S).

        The algorithm's own prediction (LC-Fed: the calibrated S* with the head bank), in batches of
        ``eval_batch_size`` on the trainer's device and precision.
        """
        self.model.eval()
        out = []
        bs = self.config.eval_batch_size
        try:
            for i in range(0, len(images), bs):
                out.append(self.algorithm.predict(self.ctx, images[i : i + bs].to(self.device)).float().cpu())
        finally:
            self.model.train()
        if not out:
            return torch.zeros((0, self.data.info.n_classes, *images.shape[2:]))
        return torch.cat(out)

    def predict(self, split: str = "validation") -> torch.Tensor:
        """Final probabilities for every slice of a split, (N, C, H, W) on the CPU."""
        return self.predict_images(self.data.splits[split].images)

    @torch.no_grad()
    def explain_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Intermediate maps (prediction, disagreement, ...) of preprocessed slices, on the CPU, in batches."""
        self.model.eval()
        parts: list[dict[str, torch.Tensor]] = []
        bs = self.config.eval_batch_size
        try:
            for i in range(0, len(images), bs):
                maps = self.algorithm.explain(self.ctx, images[i : i + bs].to(self.device))
                parts.append({k: v.float().cpu() for k, v in maps.items()})
        finally:
            self.model.train()
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def explain(self, split: str, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """Intermediate maps (prediction, disagreement, ...) for a few slices, for figures."""
        return self.explain_images(self.data.splits[split].images[list(index)])

    def evaluate(self, split: str = "validation", surface: bool = True) -> dict[str, Any]:
        """Per-case metrics (threshold 0.5, optional LCC, per patient in 3-D) and their means.

        Metrics are computed at the working size; HD95/ASSD use each case's spacing at that size (the
        stored spacing rescaled by stored/working size, see ``working_spacing``), so they are in true
        millimetres (or stored pixels when the data set gives no spacing) whatever the preset's size.
        ``surface=False`` skips HD95/ASSD (per-round validation needs Dice only).
        """
        from .metrics import evaluate_site

        data = self.data.splits[split]
        if len(data) == 0:
            raise ValueError(f"site {self.site!r} has no {split!r} data to evaluate")
        probs = self.predict(split)
        case_spacing = {}
        for case, spacing in zip(data.case_ids, data.spacing):
            case_spacing.setdefault(str(case), spacing)
        return evaluate_site(
            data.case_ids,
            data.slices,
            [p.numpy() for p in probs],
            [y.numpy() > 0.5 for y in data.labels],
            largest_cc=self.data.info.largest_component,
            spacing=case_spacing or None,
            surface=surface,
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed here."""
        cfg = self.config.to_dict()
        return {
            "algorithm": self.algorithm.name,
            "sites": list(self.sites),
            "site": self.site,
            "config": {k: cfg[k] for k in ("width", "size", "lr", "batch_size", "personal_iterations", "seed")},
            "channels": self.data.info.channels,
            "labels": list(self.data.info.labels),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "identity": self.identity(),
            "round": self.round,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizers": {k: o.state_dict() for k, o in self.ctx.optimizers.items()},
            "head_bank": self.ctx.head_bank.state_dict(),
            "extra": self.ctx.extra,
            "generator": self.generator.get_state(),
            "order": list(self._order),
            "history": list(self.history),
            "config": self.config.to_dict(),
            # what prediction at the site needs from dataset.json (label codes, post-processing); not identity
            "data": {
                "name": self.data.info.name,
                "labels": {k: list(v) for k, v in self.data.info.labels.items()},
                "largest_component": self.data.info.largest_component,
                "kind": self.data.info.extra.get("kind"),  # the importer that wrote the data set, if any
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore a site; raises :class:`CheckpointMismatch` naming what differs."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointMismatch(f"{source}: unsupported checkpoint version {state.get('version')!r}")
        mine, theirs = self.identity(), state.get("identity", {})
        diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs this run {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diffs:
            raise CheckpointMismatch(f"site {self.site!r}: {source} is from another configuration: " + "; ".join(diffs))
        self.model.load_state_dict(state["model"])
        for k, opt in self.ctx.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.ctx.head_bank.load_state_dict(state["head_bank"])
        self.ctx.extra = dict(state.get("extra", {}))
        self.generator.set_state(state["generator"])
        self._order = list(state["order"])
        self.round = int(state["round"])
        self.history = list(state.get("history", []))

    def save(self, path: str | os.PathLike, **meta: Any) -> None:
        atomic_torch_save({**self.state_dict(), "meta": meta}, path)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointMismatch(f"site {self.site!r}: cannot read checkpoint {path}: {e}") from None
        self.load_state_dict(state, source=str(path))
        return state.get("meta", {})
