"""FLARE adapters without a running FLARE: the aggregator, the learner's task handling, the job export."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeFLContext, start_learner
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants

import lcfed
from lcfed.ops.jobs import export_committed_jobs
from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import make_config
from lcfed.runtime.contract import BANK_PREFIX, ContractViolation, bank_key
from lcfed.runtime.fl.aggregator import HeadBankAggregator
from lcfed.runtime.fl.learner import LCFedLearner
from lcfed.runtime.fl.persistor import GlobalStatePersistor
from lcfed.runtime.fl.reference import reference_model

SITES = ["site-a", "site-b", "site-c"]
MODEL_ARGS = dict(algorithm="lcfed", sites=SITES, preset="tiny", options=None, in_channels=1, n_classes=2)
REPO = Path(__file__).resolve().parents[1]


def outgoing_like(value: float) -> dict[str, np.ndarray]:
    algo, model, _ = reference_model(**MODEL_ARGS)
    return {
        k: np.full(tuple(v.shape), value, np.float32)
        for k, v in algo.contract.select_outgoing(model.state_dict()).items()
    }


def result(site: str, value: float, params=None) -> FLModel:
    return FLModel(
        params_type=ParamsType.FULL,
        params=params if params is not None else outgoing_like(value),
        metrics={"val_dice": value},
        meta={"client_name": site, "n_train": 10, MetaKey.NUM_STEPS_CURRENT_ROUND: 3},
    )


def test_aggregator_averages_shared_banks_heads_and_sends_all_heads_back():
    agg = HeadBankAggregator(**MODEL_ARGS)
    agg.reset_stats()
    for i, s in enumerate(SITES):
        agg.accept_model(result(s, float(i)))
    out = agg.aggregate_model()
    params = out.params
    contract = get_algorithm("lcfed").contract
    shared = [k for k in params if not k.startswith(BANK_PREFIX)]
    assert shared and all(contract.is_shared(k) for k in shared)
    assert all(np.allclose(params[k], 1.0) for k in shared)  # mean of 0, 1, 2
    assert not any(k.startswith(("head.", "hc.")) for k in params)  # personal keys never averaged or sent as such
    for i, s in enumerate(SITES):  # one head per site, each unchanged
        assert np.all(params[bank_key(s, "head.weight")] == float(i))
        assert np.all(params[bank_key(s, "head.bias")] == float(i))
    assert len([k for k in params if k.startswith(BANK_PREFIX)]) == 2 * len(SITES)
    assert out.metrics["val_dice"] == pytest.approx(1.0)
    assert agg.rounds[-1]["shared_change"] > 0


def test_aggregator_raises_on_an_empty_round():
    agg = HeadBankAggregator(**MODEL_ARGS)
    agg.reset_stats()
    with pytest.raises(RuntimeError, match=r"only 0 site\(s\).*missing: \[.site-a., .site-b., .site-c.\]"):
        agg.aggregate_model()


def test_aggregator_rejects_a_result_that_breaks_the_contract_naming_the_site():
    agg = HeadBankAggregator(**MODEL_ARGS)
    agg.reset_stats()
    leaking = outgoing_like(0.0)
    leaking["hc.conv.weight"] = np.zeros((2, 16, 3, 3), np.float32)
    with pytest.raises(ContractViolation, match="site 'site-b'.*hc.conv.weight"):
        agg.accept_model(result("site-b", 0.0, leaking))
    with pytest.raises(ValueError, match="not in the job's site list"):
        agg.accept_model(result("intruder", 0.0))


def test_aggregator_keeps_the_global_model_in_head_only_rounds_and_refuses_a_mix():
    """Staged HC rounds: every site sends only its head; the global shared model stays as it was."""
    agg = HeadBankAggregator(**MODEL_ARGS)
    agg.reset_stats()
    for i, s in enumerate(SITES):
        agg.accept_model(result(s, float(i)))
    first = agg.aggregate_model().params
    heads = {k: v for k, v in outgoing_like(5.0).items() if k.startswith("head.")}
    agg.reset_stats()
    for s in SITES:
        agg.accept_model(result(s, 5.0, heads))
    second = agg.aggregate_model().params
    shared = [k for k in first if not k.startswith(BANK_PREFIX)]
    assert shared and all(np.array_equal(first[k], second[k]) for k in shared)
    assert all(np.all(second[bank_key(s, "head.weight")] == 5.0) for s in SITES)
    assert agg.rounds[-1]["shared_change"] == 0.0
    assert {s: v["n_keys"] for s, v in agg.rounds[-1]["sites"].items()} == {s: 2 for s in SITES}
    agg.reset_stats()
    agg.accept_model(result("site-a", 1.0))
    agg.accept_model(result("site-b", 1.0, heads))
    agg.accept_model(result("site-c", 1.0))
    with pytest.raises(ContractViolation, match=r"\['site-b'\] sent only their head"):
        agg.aggregate_model()


@pytest.mark.parametrize("algorithm", ["fedbn", "lcfed-pn", "lcfed-pn-no-hc"])
def test_aggregator_refuses_site_local_normalisation_state(algorithm):
    args = {**MODEL_ARGS, "algorithm": algorithm}
    algo, model, _ = reference_model(**args)
    state = model.state_dict()
    sent = {k: v.numpy() for k, v in algo.contract.select_outgoing(state).items()}
    assert sent and not any(".norm." in k for k in sent)
    agg = HeadBankAggregator(**args)
    agg.reset_stats()
    agg.accept_model(result("site-a", 0.0, sent))  # the contract's own message passes
    leaking = dict(sent)
    key = next(k for k in state if k.endswith(".norm.running_mean"))
    leaking[key] = state[key].numpy()
    with pytest.raises(ContractViolation, match=f"site 'site-b'.*{key}"):
        agg.accept_model(result("site-b", 0.0, leaking))


def test_persistor_initial_model_is_every_sites_initial_shared_model(tiny_data, tmp_path):
    """The server's round-0 global model equals the shared part of the model each site builds by itself."""
    from nvflare.app_common.abstract.model import ModelLearnableKey

    from lcfed.ops.federation import build_trainers

    learnable = GlobalStatePersistor(**MODEL_ARGS).load_model(fl_ctx=FakeFLContext(tmp_path))
    weights = learnable[ModelLearnableKey.WEIGHTS]
    for site in build_trainers("lcfed", tiny_data, make_config("tiny"), sites=SITES):
        state = site.model.state_dict()
        assert set(weights) == {k for k in state if not k.startswith(("head.", "hc."))}
        for k, v in weights.items():
            np.testing.assert_array_equal(v, state[k].numpy(), err_msg=f"{site.site}: {k}")


@pytest.fixture
def learner(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LCFED_DATA_ROOT", tiny_data)
    return start_learner(LCFedLearner(**MODEL_ARGS, tensorboard=False), FakeFLContext(tmp_path, "site-a"))


def train_task(params, round_idx=0, total=2):
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=params).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_idx)
    shareable.set_header(AppConstants.NUM_ROUNDS, total)
    return shareable


def test_learner_merges_global_keeps_personal_and_returns_shared_plus_head(learner, tmp_path):
    model = learner.trainer.model
    personal = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("head.", "hc."))}
    glob = {k: v.numpy() for k, v in model.state_dict().items() if learner.trainer.contract.is_shared(k)}
    glob = {k: np.zeros_like(v) for k, v in glob.items()}
    glob[bank_key("site-b", "head.weight")] = np.ones(tuple(model.head.weight.shape), np.float32)
    glob[bank_key("site-b", "head.bias")] = np.ones(tuple(model.head.bias.shape), np.float32)

    # the merge alone: shared replaced, personal untouched, the bank filled
    learner.trainer.receive(glob)
    state = model.state_dict()
    assert all(torch.count_nonzero(state[k]) == 0 for k in glob if not k.startswith(BANK_PREFIX))
    assert all(torch.equal(state[k], v) for k, v in personal.items())
    assert learner.trainer.ctx.head_bank.sites() == ["site-b"]

    reply = learner.train(train_task(glob), FakeFLContext(tmp_path, "site-a"), Signal())
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert set(dxo.data) == {k for k in model.state_dict() if not k.startswith("hc.")}
    assert dxo.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == make_config("tiny").iterations
    assert isinstance(dxo.meta[MetaKey.INITIAL_METRICS], dict)  # never a bare float (FLARE pitfall 1)
    ckpt = tmp_path / "lcfed_models" / "lcfed"
    assert (ckpt / "best.pt").is_file() and (ckpt / "last.pt").is_file() and (ckpt / "history.json").is_file()


def test_learner_resumes_its_own_state_after_a_restart(learner, tiny_data, tmp_path, monkeypatch):
    glob = {
        k: v.numpy() for k, v in learner.trainer.model.state_dict().items() if learner.trainer.contract.is_shared(k)
    }
    learner.train(train_task(glob, 0), FakeFLContext(tmp_path, "site-a"), Signal())
    before = {k: v.clone() for k, v in learner.trainer.model.state_dict().items()}
    again = start_learner(LCFedLearner(**MODEL_ARGS, tensorboard=False), FakeFLContext(tmp_path, "site-a"))
    assert again.trainer.round == 1 and len(again.round.history) == 1
    for k, v in again.trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_learner_refuses_a_site_outside_the_job(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LCFED_DATA_ROOT", tiny_data)
    lrn = LCFedLearner(**{**MODEL_ARGS, "sites": ["site-b", "site-c"]}, tensorboard=False)
    with pytest.raises(ValueError, match="'site-a' is not in the job's site list"):
        start_learner(lrn, FakeFLContext(tmp_path, "site-a"))


def test_learner_checks_the_model_against_the_site_data(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LCFED_DATA_ROOT", tiny_data)
    lrn = LCFedLearner(**{**MODEL_ARGS, "n_classes": 3}, tensorboard=False)
    with pytest.raises(ValueError, match="3 class"):
        start_learner(lrn, FakeFLContext(tmp_path, "site-a"))


def test_every_algorithm_has_a_committed_job():
    from lcfed.ops.jobs import COMMITTED_JOBS
    from lcfed.runtime.algorithms import ALGORITHMS

    assert sorted(COMMITTED_JOBS) == sorted(ALGORITHMS)
    committed = sorted(p.parent.name for p in (REPO / "jobs").glob("*/meta.json"))
    assert committed == sorted(COMMITTED_JOBS), "run: python -m lcfed job export-committed"


def test_committed_jobs_equal_a_fresh_export(tmp_path):
    export_committed_jobs(tmp_path)
    for job in tmp_path.iterdir():
        committed = REPO / "jobs" / job.name
        assert committed.is_dir(), f"jobs/{job.name} is not committed; run: python -m lcfed job export-committed"
        cmp = filecmp.dircmp(job, committed, ignore=["__pycache__"])
        diffs = _diff(cmp)
        assert not diffs, f"jobs/{job.name} differs from a fresh export ({diffs[:5]}); re-export it"


def _diff(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [prefix + n for n in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files]
    # dircmp compares shallowly (size and mtime); compare contents
    out += [
        prefix + n for n in cmp.same_files if not filecmp.cmp(Path(cmp.left) / n, Path(cmp.right) / n, shallow=False)
    ]
    for name, sub in cmp.subdirs.items():
        out += _diff(sub, prefix + name + "/")
    return out


def test_an_earlier_run_is_archived_not_overwritten_and_resume_continues_it(learner, tmp_path, monkeypatch):
    glob = {
        k: v.numpy() for k, v in learner.trainer.model.state_dict().items() if learner.trainer.contract.is_shared(k)
    }
    learner.train(train_task(glob, 0), FakeFLContext(tmp_path, "site-a"), Signal())
    models = tmp_path / "lcfed_models" / "lcfed"
    first_best = (models / "best.pt").read_bytes()

    fresh = start_learner(LCFedLearner(**MODEL_ARGS, tensorboard=False), FakeFLContext(tmp_path, "site-a", "job2"))
    assert fresh.trainer.round == 0 and not (models / "best.pt").exists()
    archived = list((models / "previous").glob("*-job1/best.pt"))
    assert len(archived) == 1 and archived[0].read_bytes() == first_best  # nothing saved before is lost

    # an explicit resume continues an earlier job's state
    learner.train(train_task(glob, 1), FakeFLContext(tmp_path, "site-a"), Signal())
    resumed = LCFedLearner(**MODEL_ARGS, tensorboard=False, resume=True)
    start_learner(resumed, FakeFLContext(tmp_path, "site-a", "job2"))
    assert resumed.trainer.round == 2


def test_a_failed_job_reports_the_servers_reason(tmp_path):
    from lcfed.ops.run import RunFailed, judge_job

    ws = tmp_path / "workspace"
    (ws / "app_server").mkdir(parents=True)
    (ws / "log.txt").write_text(
        "2026-11-27 14:27:31,237 - SiteListFedAvg - ERROR - [identity=p] - Exception in model controller run: "
        "RuntimeError: only 2 site(s) ['site-a', 'site-b'] returned a result this round; the job needs 3 "
        "(min_clients); missing: ['site-c']\n"
    )
    job = {"sites": ["site-a", "site-b", "site-c"], "rounds": 2, "min_clients": None}
    with pytest.raises(RunFailed, match=r"EXECUTION_EXCEPTION; server: .*missing: \['site-c'\]"):
        judge_job("FINISHED:EXECUTION_EXCEPTION", ws, job, print)
    # ABNORMAL is accepted only when the job tolerates missing sites, and then only with every round run
    with pytest.raises(RunFailed, match="ABNORMAL"):
        judge_job("FINISHED:ABNORMAL", ws, job, print)
    with pytest.raises(RunFailed, match="aggregated no round"):
        judge_job("FINISHED:ABNORMAL", ws, {**job, "min_clients": 2}, print)
    rounds = [{"round": r, "sites": ["site-a", "site-b"] if r else job["sites"]} for r in range(2)]
    (ws / "app_server" / "lcfed_rounds.json").write_text(json.dumps({"rounds": rounds}))
    record = judge_job("FINISHED:ABNORMAL", ws, {**job, "min_clients": 2}, print)
    assert len(record["rounds"]) == 2
    # a dead site's half-sent result can make FLARE say EXECUTION_EXCEPTION: the round record decides
    assert judge_job("FINISHED:EXECUTION_EXCEPTION", ws, {**job, "min_clients": 2}, print) == record
    with pytest.raises(RunFailed, match="EXECUTION_EXCEPTION"):  # ... but never for a job that needs every site
        judge_job("FINISHED:EXECUTION_EXCEPTION", ws, job, print)
    full = [{"round": r, "sites": job["sites"]} for r in range(2)]
    (ws / "app_server" / "lcfed_rounds.json").write_text(json.dumps({"rounds": full}))
    with pytest.raises(RunFailed, match="no site dropped out"):  # nobody dropped: a real failure
        judge_job("FINISHED:EXECUTION_EXCEPTION", ws, {**job, "min_clients": 2}, print)


def test_the_flare_learner_and_the_in_process_loop_run_the_same_site_round(learner, tiny_data, tmp_path):
    """One round protocol: FLARE's learner is an adapter around SiteRound, so both send the same bytes."""
    from lcfed.ops.federation import build_trainers
    from lcfed.runtime.site_round import SiteRound

    glob = {
        k: v.numpy().copy()
        for k, v in learner.trainer.model.state_dict().items()
        if learner.trainer.contract.is_shared(k)
    }
    sent = from_shareable(learner.train(train_task(glob), FakeFLContext(tmp_path, "site-a"), Signal())).data
    twin = build_trainers("lcfed", tiny_data, make_config("tiny"), sites=SITES)[0]
    reply = SiteRound(twin).run(glob, 0, make_config("tiny").rounds)
    assert set(sent) == set(reply["params"])
    for k, v in reply["params"].items():
        np.testing.assert_array_equal(sent[k], v, err_msg=k)


def test_a_site_that_refuses_the_job_says_why_in_every_reply(tiny_data, tmp_path, monkeypatch):
    from nvflare.apis.fl_constant import ReturnCode

    from lcfed.runtime.fl.controller import REFUSAL_HEADER

    monkeypatch.setenv("LCFED_DATA_ROOT", tiny_data)
    lrn = LCFedLearner(**MODEL_ARGS, tensorboard=False, bundle_version="0.0.1")
    lrn.initialize({}, FakeFLContext(tmp_path, "site-a"))  # no exception: the refusal travels to the server
    assert lrn.trainer is None
    reply = lrn.train(train_task({}), FakeFLContext(tmp_path, "site-a"), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    reason = reply.get_header(REFUSAL_HEADER)
    assert reason.startswith("BundleVersionMismatch: site 'site-a' refuses the job")
    assert "lcfed 0.0.1" in reason and f"lcfed {lcfed.__version__}" in reason


def test_committed_jobs_are_configuration_only_and_pinned():
    """A job folder carries meta.json and app/config/*.json, no code, and names the installed bundle version."""
    for job in (REPO / "jobs").iterdir():
        files = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
        assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"], job
        client = json.loads((job / "app/config/config_fed_client.json").read_text())
        server = json.loads((job / "app/config/config_fed_server.json").read_text())
        learner = next(c for c in client["components"] if c["id"] == "learner")
        persistor = next(c for c in server["components"] if c["id"] == "persistor")
        assert learner["args"]["bundle_version"] == persistor["args"]["bundle_version"] == lcfed.__version__


def test_every_class_a_job_names_is_on_the_allow_list(tmp_path):
    """What the provisioning builder allows covers every job option; nothing unused is allowed."""
    from lcfed.ops.jobs import JobSpec, export_job, job_class_paths
    from lcfed.ops.provisioning import allowed_classes

    named = set()
    for job in (REPO / "jobs").iterdir():
        named |= job_class_paths(job)
    options = JobSpec(
        preset="tiny",
        name="all-options",
        percentile_privacy={"percentile": 10, "gamma": 0.01},
        exclude_vars="pcs",
        quantize="float16",
    )
    named |= job_class_paths(export_job(options, tmp_path))
    assert named == set(allowed_classes())


def test_the_packed_job_carries_only_the_runtime_which_imports_nothing_else(tmp_path):
    import subprocess
    import sys

    from lcfed.ops.jobs import pack_job

    packed = pack_job(REPO / "jobs" / "lcfed", tmp_path)
    custom = packed / "app" / "custom"
    assert sorted(p.name for p in (custom / "lcfed").iterdir()) == ["__init__.py", "runtime"]
    assert not list(custom.rglob("cli.py")) and not list(custom.rglob("importers.py"))
    # the job's copy is what FLARE imports (app/custom comes first); loading every FLARE component from it
    # must not need the operations side
    probe = (
        "import sys, importlib; sys.path.insert(0, sys.argv[1]); import lcfed; "
        "assert lcfed.__file__.startswith(sys.argv[1]), lcfed.__file__; "
        "[importlib.import_module('lcfed.runtime.fl.' + m) for m in "
        "('learner', 'aggregator', 'persistor', 'controller', 'audit', 'traffic', 'quantization', 'byoc_guard')]; "
        "assert not [m for m in sys.modules if m.startswith('lcfed.ops')], 'the runtime imported lcfed.ops'"
    )
    subprocess.run([sys.executable, "-c", probe, str(custom)], check=True)
