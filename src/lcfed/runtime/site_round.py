"""One site's round, whoever drives it: receive, evaluate, train, evaluate, keep checkpoints, send.

FLARE's learner (:mod:`lcfed.runtime.fl.learner`) and the in-process federation
(:mod:`lcfed.ops.federation`) both call :class:`SiteRound`; they differ only in how the server's message
arrives and how the reply leaves. :class:`CheckpointStore` is the one place that rotates, archives,
resumes and steps back a site's personalized checkpoints (and :func:`archive_files` the server's state).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.layout import write_json_atomic
from .trainer import CheckpointMismatch, SiteTrainer

__all__ = ["SiteRound", "CheckpointStore", "RoundReply", "archive_files", "BEST", "LAST", "PREVIOUS", "HISTORY"]

BEST = "best.pt"
LAST = "last.pt"
PREVIOUS = "previous.pt"  # one round back, for a server that restarts the round this site already trained
HISTORY = "history.json"
SUMMARY = "summary.json"


def archive_files(directory: str | Path, label: str = "") -> Path | None:
    """Move the files of ``directory`` (not its folders) to ``previous/<timestamp>[-label]/``; None if none."""
    directory = Path(directory)
    files = [f for f in directory.iterdir() if f.is_file()] if directory.is_dir() else []
    if not files:
        return None
    archive = directory / "previous" / (time.strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else ""))
    archive.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), archive / f.name)
    return archive


class CheckpointStore:
    """A site's personalized checkpoints of one run, in one folder.

    ``last.pt`` after every round (the round before it kept as ``previous.pt``), ``best.pt`` whenever the
    validation Dice improves, ``history.json`` (one record per round) and ``summary.json`` at the end. An
    earlier run's files are archived, never overwritten.
    """

    def __init__(self, directory: str | Path, job_id: str = ""):
        self.directory = Path(directory)
        self.job_id = job_id
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / name

    def last_job(self) -> str | None:
        """The job that wrote ``last.pt`` (None without one)."""
        last = self.path(LAST)
        if not last.is_file():
            return None
        meta = torch.load(last, map_location="cpu", weights_only=True).get("meta", {})
        return meta.get("job_id", "")

    def archive(self, label: str = "") -> Path | None:
        return archive_files(self.directory, label)

    def save(self, trainer: SiteTrainer, name: str, **meta: Any) -> None:
        trainer.save(self.path(name), job_id=self.job_id, **meta)

    def save_last(self, trainer: SiteTrainer, round_idx: int) -> None:
        if self.path(LAST).is_file():
            shutil.copy2(self.path(LAST), self.path(PREVIOUS))
        self.save(trainer, LAST, round=round_idx)

    def load_last(self, trainer: SiteTrainer) -> dict[str, Any]:
        return trainer.load(self.path(LAST))

    def step_back(self, trainer: SiteTrainer, round_idx: int) -> bool:
        """Restore ``previous.pt`` if it holds the site as it was before ``round_idx``; False otherwise."""
        previous = self.path(PREVIOUS)
        if not previous.is_file():
            return False
        state = torch.load(previous, map_location="cpu", weights_only=True)
        if int(state["round"]) != round_idx:
            return False
        trainer.load_state_dict(state, source=str(previous))
        return True

    def write_history(self, history: list[dict[str, Any]]) -> None:
        write_json_atomic(self.path(HISTORY), history)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path(SUMMARY), summary)


class RoundReply(dict):
    """What a site sends after a round: ``params`` (the contract's outgoing keys), ``steps``, ``n_train``,
    ``val_dice`` (the validation Dice of the model evaluated this round, or None) and ``stats``."""


class SiteRound:
    """The protocol of one site in a federation, independent of the transport.

    Args:
        trainer: the site's trainer (model, algorithm, data).
        store: where its personalized checkpoints go (None: keep nothing on disk, e.g. tests).
        log: progress lines.
        on_metrics: called with (scalars, round) after training and after each validation (TensorBoard).
    """

    def __init__(
        self,
        trainer: SiteTrainer,
        store: CheckpointStore | None = None,
        log: Callable[[str], None] | None = None,
        on_metrics: Callable[[dict[str, float], int], None] | None = None,
    ):
        self.trainer = trainer
        self.store = store
        self.log = log or (lambda _: None)
        self.on_metrics = on_metrics
        self.history: list[dict[str, Any]] = []
        self.best_dice = -1.0

    @property
    def site(self) -> str:
        return self.trainer.site

    # -- start -------------------------------------------------------------------------------------
    def start(self, resume: bool = False) -> None:
        """Continue this job's (or, with ``resume``, an earlier job's) checkpoint, or archive an earlier run."""
        if self.store is None:
            return
        previous_job = self.store.last_job()
        if previous_job is None:
            return
        if previous_job == self.store.job_id or resume:
            # the same job restarted (a killed process, a simulator client swapped out) or an explicit resume;
            # a checkpoint of another configuration fails here with CheckpointMismatch
            meta = self.store.load_last(self.trainer)
            self._set_history(self.trainer.history)
            self.log(
                f"site {self.site}: resumed from {self.store.path(LAST)} (round {meta.get('round')}, "
                f"job {previous_job})"
            )
            return
        archive = self.store.archive(previous_job)
        self.log(f"site {self.site}: an earlier run's models were moved to {archive}")

    def _set_history(self, history: list[dict[str, Any]]) -> None:
        self.history = list(history)
        self.best_dice = max((h["val_dice"] for h in self.history if "val_dice" in h), default=-1.0)

    # -- the round ---------------------------------------------------------------------------------
    def align(self, round_idx: int) -> None:
        """A resumed server may restart the round this site already trained: step back one checkpoint."""
        trainer = self.trainer
        if trainer.round <= round_idx:
            if 0 < trainer.round < round_idx:
                self.log(f"site {self.site} rejoins at round {round_idx + 1} (last trained {trainer.round})")
            return
        if self.store is not None and self.store.step_back(trainer, round_idx):
            self._set_history([h for h in trainer.history if h["round"] < round_idx])
            self.log(f"site {self.site}: server restarts round {round_idx + 1}; stepped back one checkpoint")
            return
        where = self.store.directory if self.store is not None else "memory"
        raise CheckpointMismatch(
            f"site {self.site!r} has trained up to round {trainer.round} but the server asks for round "
            f"{round_idx + 1}, and no checkpoint of round {round_idx} is kept in {where}"
        )

    def run(
        self,
        received: Mapping[str, Any],
        round_idx: int,
        total: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> RoundReply | None:
        """Receive, evaluate, train, evaluate, keep checkpoints; the reply to send (None if aborted).

        Algorithms evaluated on the global model (FedAvg, FedProx) score what arrived as round r-1's
        model; personalized ones score their own model after training.
        """
        trainer = self.trainer
        self.align(round_idx)
        trainer.receive(received, round_idx)
        evaluated = None
        if not trainer.algorithm.personalized and round_idx > 0:
            evaluated = self.validate(round_idx - 1, total, "global model")
        stats = trainer.train_round(round_idx, should_stop=should_stop)
        if stats["aborted"]:
            return None
        self._entry(round_idx).update(stats, total_rounds=total)
        if trainer.algorithm.personalized:
            evaluated = self.validate(round_idx, total, "personalized model")
        if self.store is not None:
            self.store.save_last(trainer, round_idx)
        self._flush_history()
        losses = ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if k.endswith(("loss", "contrastive", "proximal")))
        self.log(f"site {self.site} round {round_idx + 1}/{total}: {losses}; train {stats['train_time']:.1f} s")
        self._metrics({k: v for k, v in stats.items() if k not in ("round", "aborted", "steps")}, round_idx)
        return RoundReply(
            params=trainer.outgoing(round_idx),
            steps=int(stats["steps"]),
            n_train=trainer.data.n_train,
            val_dice=None if evaluated is None else float(evaluated["dice"]),
            stats=stats,
        )

    def final_validation(self, received: Mapping[str, Any] | None, total: int) -> dict[str, Any]:
        """After the last round: a global-model site evaluates (and may keep) the final aggregate it receives;
        a personalized site reports its own model's validation metrics."""
        trainer = self.trainer
        if not trainer.algorithm.personalized:
            trainer.receive(received or {})
            val = self.validate(trainer.round - 1, total, "final global model")
            self._flush_history()
            return val
        val = trainer.evaluate("validation", surface=False)
        self.log(f"site {self.site}: final personalized model, val dice {val['dice']:.4f}")
        return val

    def validate(self, round_idx: int, total: int, what: str) -> dict[str, Any]:
        """Validate the current model as round ``round_idx``'s; keep it as best.pt if it is the best so far."""
        t0 = time.perf_counter()
        val = self.trainer.evaluate("validation", surface=False)
        self._entry(round_idx).update(val_dice=val["dice"], val_iou=val["iou"], val_time=time.perf_counter() - t0)
        self.trainer.history = self.history
        improved = val["dice"] > self.best_dice
        if improved:
            self.best_dice = val["dice"]
            if self.store is not None:
                self.store.save(self.trainer, BEST, round=round_idx, val_dice=val["dice"])
        self.log(
            f"site {self.site} round {round_idx + 1}/{total}: {what} val dice {val['dice']:.4f}"
            + (" (best)" if improved else "")
        )
        self._metrics({"val_dice": val["dice"], "val_iou": val["iou"]}, round_idx)
        return val

    def finish(self) -> None:
        if self.store is not None and self.history:
            self.store.write_summary({"site": self.site, "best_val_dice": self.best_dice, "rounds": len(self.history)})

    # -- records -----------------------------------------------------------------------------------
    def _entry(self, round_idx: int) -> dict[str, Any]:
        for h in self.history:
            if h["round"] == round_idx:
                return h
        self.history.append({"round": round_idx})
        self.history.sort(key=lambda h: h["round"])
        return self._entry(round_idx)

    def _flush_history(self) -> None:
        self.trainer.history = self.history
        if self.store is not None:
            self.store.write_history(self.history)

    def _metrics(self, record: dict[str, Any], step: int) -> None:
        if self.on_metrics is None:
            return
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float, np.floating))}
        self.on_metrics(scalars, step)
