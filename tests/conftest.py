"""Shared fixtures: a tiny demo data set built once per test session, and CPU settings."""

from __future__ import annotations

import os

import pytest
import torch

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
