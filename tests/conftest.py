"""Shared fixtures: a tiny demo data set built once per test session, and CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from nvflare.apis.fl_context import FLContext

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """The real demo builder at 32x32 with 3 sites (seconds)."""
    from lcfed.ops.data.demo import build_demo

    out = tmp_path_factory.mktemp("data") / "demo3"
    build_demo(out, n_sites=3, size=32, seed=0, verbose=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_data2(tmp_path_factory) -> str:
    """Two sites at 32x32, for end-to-end FLARE tests."""
    from lcfed.ops.data.demo import build_demo

    out = tmp_path_factory.mktemp("data") / "demo2"
    build_demo(out, n_sites=2, size=32, seed=0, verbose=False)
    return str(out)


class FakeEngine:
    """The part of FLARE's engine the bundle's components use: the workspace root and the job's app folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get_workspace(self):
        return self

    def get_root_dir(self):
        return str(self.root)

    def get_app_dir(self, job_id):
        return str(self.root / job_id)

    def fire_event(self, event_type, fl_ctx):  # FLComponent.log_error fires an event; nothing listens here
        pass


class FakeFLContext(FLContext):
    """An FLContext for a participant named ``site`` whose workspace is ``root``, in job ``job``."""

    def __init__(self, root: Path, site: str = "site-a", job: str = "job1"):
        super().__init__()
        self._engine, self._site, self._job = FakeEngine(root), site, job

    def get_engine(self):
        return self._engine

    def get_identity_name(self, default=""):
        return self._site

    def get_job_id(self, default=""):
        return self._job


def start_learner(learner, ctx: FLContext):
    """``learner.initialize`` as FLARE calls it; a site that refuses the job raises its reason here."""
    learner.initialize({}, ctx)
    if learner.refusal_error is not None:
        raise learner.refusal_error
    return learner
