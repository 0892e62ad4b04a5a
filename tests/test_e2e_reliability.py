"""Resume, determinism and what leaves a site, through FLARE's simulator (tiny preset, 2 sites).

One uninterrupted 3-round run is made twice (same seed: same results) and once as 2 rounds + a resumed
job (same results as uninterrupted). The outgoing audit of each site and the server's own record of
what arrived prove that only shared parameters, the site's head and scalar metrics left the sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lcfed.ops.run import RunFailed, run_and_report
from lcfed.runtime.algorithms import ModelSpec, get_algorithm
from lcfed.runtime.fl.audit import AUDIT_FILE, read_audit
from lcfed.runtime.fl.traffic import TRAFFIC_FILE

pytestmark = pytest.mark.e2e
ALGO = "lcfed-joint"  # every round trains body, head and HC: the resumed round exercises all of them
SITES = ["site-a", "site-b"]


def _quiet(_: str) -> None:
    pass


def _run(data, ws, rounds, **kwargs):
    return run_and_report(ALGO, data, ws, preset="tiny", options={"rounds": rounds}, show=_quiet, **kwargs)


@pytest.fixture(scope="module")
def runs(tiny_data2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    _run(tiny_data2, root / "first", 3)
    _run(tiny_data2, root / "second", 3)
    _run(tiny_data2, root / "resumed", 2)
    _run(tiny_data2, root / "resumed", 3, resume=True)
    return {name: root / name for name in ("first", "second", "resumed")}


def _site_state(ws: Path, site: str) -> dict:
    return torch.load(ws / "models" / site / ALGO / "last.pt", weights_only=True)


def _metrics(ws: Path) -> dict:
    return json.loads((ws / "results" / "metrics.json").read_text())


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    for site in SITES:
        for m in ("dice", "iou", "hd95", "assd"):
            assert ma["sites"][site][m] == pytest.approx(mb["sites"][site][m], abs=1e-6), (site, m)
        sa, sb = _site_state(a, site), _site_state(b, site)
        assert sa["round"] == sb["round"] == 3
        for k, v in sa["model"].items():  # personal layers (head, HC) and shared body alike
            assert torch.allclose(v.float(), sb["model"][k].float(), atol=1e-6), (site, k)
        for group, opt in sa["optimizers"].items():  # Adam state kept at the site
            for pid, st in opt["state"].items():
                assert torch.allclose(st["exp_avg"], sb["optimizers"][group]["state"][pid]["exp_avg"], atol=1e-6)
        assert sa["head_bank"].keys() == sb["head_bank"].keys() == set(SITES)
    ga = torch.load(a / "models" / "server" / ALGO / "global_state.pt", weights_only=True)
    gb = torch.load(b / "models" / "server" / ALGO / "global_state.pt", weights_only=True)
    assert ga["round"] == gb["round"] == 2
    for k, v in ga["params"].items():  # shared model and head bank on the server
        assert torch.allclose(v, gb["params"][k], atol=1e-6), k


def test_same_seed_same_results(runs):
    _assert_same_run(runs["first"], runs["second"])


def test_a_stopped_run_resumes_where_it_stopped(runs):
    _assert_same_run(runs["first"], runs["resumed"])
    record = json.loads((runs["resumed"] / "models" / "server" / ALGO / "lcfed_rounds.json").read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]


def test_a_resume_with_nothing_left_to_train_fails(runs, tiny_data2):
    with pytest.raises(RunFailed):
        _run(tiny_data2, runs["resumed"], 3, resume=True)


def test_only_shared_parameters_the_sites_head_and_scalar_metrics_leave_a_site(runs):
    ws = runs["first"]
    algo = get_algorithm(ALGO)
    keys = list(algo.build_model(ModelSpec(1, 2, len(SITES), 4)).state_dict())
    shared = {k for k in keys if algo.contract.is_shared(k)}
    assert shared and {"head.weight", "head.bias"} <= set(keys)
    arrived = json.loads((ws / "simulator/server/simulate_job/app_server" / TRAFFIC_FILE).read_text())["from_site"]
    for site in SITES:
        sent = read_audit(ws / "models" / site / ALGO / AUDIT_FILE)
        train = [r for r in sent if r["task"] == "train"]
        assert [r["round"] for r in train] == [0, 1, 2]  # every result the site sent is in its audit
        for r in sent:
            tensors = r["tensors"]
            if r["task"] == "train":
                assert set(tensors) == shared | {"head.weight", "head.bias"}  # shared + this site's head
            else:
                assert tensors == {}  # the final validation reports metrics only
            assert not any(k.startswith("hc.") for k in tensors)  # Head Calibration never leaves
            for shape in tensors.values():  # no image-shaped array: conv kernels are at most 3x3
                assert len(shape) <= 1 or int(np.prod(shape[-2:])) <= 9, shape
            assert set(r["metrics"]) <= {"val_dice", "val_iou"}  # scalar metrics, no per-case data
            assert set(r["meta"]) <= {"NUM_STEPS_CURRENT_ROUND", "n_train", "filter_history"}
        # the server received exactly what the audit says was sent
        received = [e["keys"] for e in arrived if e["site"] == site]
        assert received == [sorted(r["tensors"]) for r in train]


def test_privacy_filters_keep_the_head_bank(tiny_data2, tmp_path):
    ws = tmp_path / "private"
    excluded = "encoder.blocks.0.convs.0"
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import run_simulator

    spec = JobSpec(
        algorithm=ALGO,
        sites=SITES,
        preset="tiny",
        options={"rounds": 2},
        exclude_vars=excluded,
        percentile_privacy={"percentile": 10, "gamma": 0.01},
    )
    # parallel=8 for 2 sites: capped at one client per site (FLARE refuses more threads than clients)
    run_simulator(spec, tiny_data2, ws, parallel=8, show=_quiet)
    record = json.loads((ws / "simulator/server/simulate_job/app_server/lcfed_rounds.json").read_text())
    for r in record["rounds"]:
        assert sorted(r["sites"]) == SITES and r["n_bank_keys"] == 2 * len(SITES)  # every head banked
    for site in SITES:
        train = [r for r in read_audit(ws / "models" / site / ALGO / AUDIT_FILE) if r["task"] == "train"]
        assert all(r["data_kind"] == "WEIGHT_DIFF" for r in train)
        assert all(not any(k.startswith(excluded) for k in r["tensors"]) for r in train)
        assert all("PercentilePrivacy" in " ".join(r["meta"]["filter_history"]) for r in train)
    # nobody sent the excluded layer: the global model keeps its initial value
    glob = torch.load(ws / "simulator/server/simulate_job/app_server/FL_global_model.pt", weights_only=True)["params"]
    from lcfed.runtime.fl.reference import reference_model

    _, model, _ = reference_model(ALGO, SITES, "tiny", {"rounds": 2}, 1, 2)
    key = f"{excluded}.conv.weight"
    assert torch.equal(glob[key], model.state_dict()[key])
