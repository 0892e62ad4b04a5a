"""Message quantization (FLARE's wire format) in both directions: filters, audit, job wiring, a simulator run."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import FakeFLContext
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.app_common.decomposers import common_decomposers
from nvflare.fuel.utils import fobs

from lcfed.runtime.contract import ContractViolation, bank_key
from lcfed.runtime.fl.audit import AUDIT_FILE, OutgoingAudit, read_audit
from lcfed.runtime.fl.quantization import (
    GPU_TYPES,
    QUANT_META_KEYS,
    MessageDequantizer,
    MessageQuantizer,
    check_quantization_type,
)
from lcfed.runtime.fl.reference import reference_model

SITES = ["site-a", "site-b"]
common_decomposers.register()  # numpy arrays in FOBS, as in every FLARE process
GPU_READY = importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()


def _outgoing(seed: int = 0) -> dict[str, np.ndarray]:
    """What a tiny LC-Fed site sends (shared keys and its head), as float32 arrays with random values."""
    algo, model, _ = reference_model("lcfed", SITES, "tiny", None, 1, 2)
    state = model.state_dict()
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, tuple(state[k].shape)).astype(np.float32) for k in algo.contract.outgoing_keys(state)}


def _through(filt, dxo: DXO, ctx) -> DXO:
    return from_shareable(filt.process(dxo.to_shareable(), ctx))


def test_float16_round_trip_is_the_float16_cast_and_the_input_is_left_alone(tmp_path):
    ctx = FakeFLContext(tmp_path)
    params = _outgoing()
    kept = {k: v.copy() for k, v in params.items()}
    sent = _through(MessageQuantizer("float16"), DXO(DataKind.WEIGHTS, params, {"n_train": 3}), ctx)
    assert all(v.dtype == np.float16 for v in sent.data.values())
    assert sent.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) == "float16" and sent.get_meta_prop("quantized_flag")
    assert set(sent.get_meta_prop("source_datatype")) == set(params)
    for k in params:  # the sender's arrays are not replaced in place (the server sends one dict to every site)
        assert params[k].dtype == np.float32 and np.array_equal(params[k], kept[k])
    back = _through(MessageDequantizer(), sent, ctx)
    assert not set(back.meta) & set(QUANT_META_KEYS) and back.get_meta_prop("n_train") == 3
    for k in params:
        assert back.data[k].dtype == np.float32
        assert np.array_equal(back.data[k], params[k].astype(np.float16).astype(np.float32))
    assert any(not np.array_equal(back.data[k], params[k]) for k in params)  # it did lose precision
    # quantizing twice changes nothing (the server re-sends banked heads that arrived in float16)
    again = _through(MessageDequantizer(), _through(MessageQuantizer("float16"), back, ctx), ctx)
    assert all(np.array_equal(again.data[k], back.data[k]) for k in params)


def test_adaquant_round_trip_is_close_and_smaller(tmp_path):
    ctx = FakeFLContext(tmp_path)
    params = _outgoing()
    shareable = DXO(DataKind.WEIGHTS, params).to_shareable()
    full = len(fobs.dumps(shareable))
    quantized = MessageQuantizer("adaquant").process(DXO(DataKind.WEIGHTS, params).to_shareable(), ctx)
    assert len(fobs.dumps(quantized)) < 0.5 * full
    back = from_shareable(MessageDequantizer().process(quantized, ctx)).data
    for k, v in params.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape
        assert np.max(np.abs(back[k] - v)) <= 0.02 * (np.max(v) - np.min(v)) + 1e-6, k


def test_messages_that_are_not_quantized_pass_the_dequantizer_unchanged(tmp_path):
    ctx = FakeFLContext(tmp_path)
    params = _outgoing()
    back = _through(MessageDequantizer(), DXO(DataKind.WEIGHTS, params), ctx)
    assert all(back.data[k] is params[k] for k in params)
    metrics = _through(MessageQuantizer("float16"), DXO(DataKind.METRICS, {"val_dice": 0.5}), ctx)
    assert metrics.data == {"val_dice": 0.5} and metrics.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) is None


def test_unknown_types_and_gpu_types_without_a_gpu_are_refused():
    with pytest.raises(ValueError, match="unknown quantization type 'int3'"):
        check_quantization_type("int3")
    if GPU_READY:
        assert check_quantization_type("Blockwise8") == "blockwise8"
    else:
        for qtype in GPU_TYPES:
            with pytest.raises(ValueError, match=f"{qtype}' needs .*on CPU use one of"):
                check_quantization_type(qtype)
        from lcfed.ops.jobs import JobSpec, build_job

        with pytest.raises(ValueError, match="'float4' needs"):
            build_job(JobSpec(preset="tiny", quantize="float4"))


@pytest.mark.skipif(not GPU_READY, reason="8- and 4-bit quantization needs bitsandbytes on a CUDA device")
@pytest.mark.parametrize("qtype", GPU_TYPES)
def test_gpu_types_round_trip_through_flares_filters(tmp_path, qtype):
    ctx = FakeFLContext(tmp_path)
    params = _outgoing()
    sent = _through(MessageQuantizer(qtype), DXO(DataKind.WEIGHTS, params), ctx)
    assert sent.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) == qtype
    back = _through(MessageDequantizer(), sent, ctx).data
    for k, v in params.items():
        assert back[k].shape == v.shape and np.max(np.abs(back[k] - v)) < 0.1


def _audit_ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("LCFED_MODELS_ROOT", str(tmp_path / "models"))
    ctx = FakeFLContext(tmp_path, site="site-a")
    ctx.set_prop(ReservedKey.TASK_NAME, "train", private=True, sticky=False)
    return ctx


@pytest.mark.parametrize("qtype", ["float16", "adaquant"])
def test_the_audit_accepts_quantized_results_and_logs_the_bytes_that_leave(tmp_path, monkeypatch, qtype):
    ctx = _audit_ctx(tmp_path, monkeypatch)
    audit = OutgoingAudit("lcfed", SITES, "tiny", None, 1, 2, run_name="q")
    params = _outgoing()
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: 4, "n_train": 3}
    quantized = MessageQuantizer(qtype).process(DXO(DataKind.WEIGHTS, params, meta).to_shareable(), ctx)
    size = len(fobs.dumps(quantized))
    audit.process(quantized, ctx)
    (record,) = read_audit(tmp_path / "models" / "site-a" / "q" / AUDIT_FILE)
    assert record["bytes"] == size and record["quantization"] == qtype
    assert 0 < record["payload"] < size and record["payload"] < 0.55 * 4 * sum(v.size for v in params.values())
    assert record["tensors"] == {k: list(v.shape) for k, v in params.items()}  # the shapes restored, not packed
    assert record["n_values"] == sum(v.size for v in params.values())
    assert set(record["meta"]) == {"NUM_STEPS_CURRENT_ROUND", "n_train", "filter_history"}


def test_the_audit_refuses_quantization_state_for_tensors_the_message_does_not_carry(tmp_path, monkeypatch):
    ctx = _audit_ctx(tmp_path, monkeypatch)
    audit = OutgoingAudit("lcfed", SITES, "tiny", None, 1, 2, run_name="q")
    quantized = MessageQuantizer("float16").process(DXO(DataKind.WEIGHTS, _outgoing()).to_shareable(), ctx)
    dxo = from_shareable(quantized)
    dxo.meta["quant_state"]["hc.weight"] = {"norm": np.zeros(9)}
    with pytest.raises(ContractViolation, match=r"metadata 'quant_state' beyond its tensors: \['hc.weight'\]"):
        audit.process(dxo.to_shareable(), ctx)


def test_the_job_quantizes_after_the_privacy_filters_and_meters_what_is_on_the_wire(tmp_path):
    from lcfed.ops.jobs import JobSpec, export_job

    job = export_job(JobSpec(preset="tiny", quantize="adaquant", exclude_vars="pcs"), tmp_path)
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    server = json.loads((job / "app/config/config_fed_server.json").read_text())

    def chain(cfg, kind):
        return {tuple(c["tasks"]): [f["path"].rsplit(".", 1)[1] for f in c["filters"]] for c in cfg[kind]}

    assert chain(client, "task_result_filters") == {
        ("train", "validate"): ["ExcludeVars", "MessageQuantizer", "OutgoingAudit"]
    }
    assert chain(client, "task_data_filters") == {("train",): ["MessageDequantizer"]}
    assert chain(server, "task_data_filters") == {("train",): ["MessageQuantizer", "TrafficMeter"]}
    assert chain(server, "task_result_filters") == {("train",): ["TrafficMeter", "MessageDequantizer"]}
    quantizers = [f for c in client["task_result_filters"] for f in c["filters"] if "Quantizer" in f["path"]]
    assert quantizers[0]["args"] == {"quantization_type": "adaquant"}


@pytest.mark.e2e
def test_a_float16_simulator_run_banks_the_heads_the_sites_sent_and_the_audit_matches_the_wire(tiny_data2, tmp_path):
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import run_simulator
    from lcfed.runtime.fl.aggregator import ROUNDS_FILE
    from lcfed.runtime.fl.traffic import TRAFFIC_FILE

    ws = tmp_path / "fp16"
    # two network rounds, no staged HC round (the checks below follow the heads of rounds 0 and 1)
    spec = JobSpec(
        algorithm="lcfed", sites=SITES, preset="tiny", options={"rounds": 2, "hc_rounds": 0}, quantize="float16"
    )
    sim = run_simulator(spec, tiny_data2, ws, show=lambda _: None)
    app = sim / "server/simulate_job/app_server"
    record = json.loads((app / ROUNDS_FILE).read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1]
    assert all(sorted(r["sites"]) == SITES and r["n_bank_keys"] == 2 * len(SITES) for r in record["rounds"])

    glob = torch.load(app / "FL_global_model.pt", weights_only=True)["params"]
    models = ws / "models"
    ckpt = {
        (s, name): torch.load(models / s / "lcfed" / f"{name}.pt", weights_only=True)
        for s in SITES
        for name in ("previous", "last")
    }
    heads = [k for k in ckpt[("site-a", "last")]["model"] if k.startswith("head.")]
    assert heads
    for sender in SITES:
        for key in heads:
            # the server banked what the sender trained in the last round, as it arrived in float16
            trained = ckpt[(sender, "last")]["model"][key]
            banked = glob[bank_key(sender, key)]
            assert banked.dtype == torch.float32
            assert torch.equal(banked, trained.half().float())
            assert not torch.equal(banked, trained) or trained.numel() == 0  # it was quantized
            # round 1 started from the bank of round 0: each site holds the sender's round-0 head, as the
            # server dequantized it (float16 again on the way down: the same values)
            trained_r0 = ckpt[(sender, "previous")]["model"][key]
            for receiver in SITES:
                held = ckpt[(receiver, "last")]["head_bank"][sender][key]
                assert torch.equal(held, trained_r0.half().float()), (receiver, sender, key)

    # the audit logged the bytes the server's meter received, per site and round
    arrived = json.loads((app / TRAFFIC_FILE).read_text())
    sent_down = {e["site"]: [] for e in arrived["to_site"]}
    for e in arrived["to_site"]:
        sent_down[e["site"]].append(e["bytes"])
    for site in SITES:
        audit = [r for r in read_audit(models / site / "lcfed" / AUDIT_FILE) if r["task"] == "train"]
        assert [r["quantization"] for r in audit] == ["float16", "float16"]
        received = [e["bytes"] for e in arrived["from_site"] if e["site"] == site]
        # the same DXO at both ends; FLARE adds its task headers after the site's filters (about 1 kB)
        assert [r["payload"] for r in audit] == [e["payload"] for e in arrived["from_site"] if e["site"] == site]
        assert all(0 <= b - r["bytes"] < 2000 for r, b in zip(audit, received))
        values = audit[0]["n_values"]
        head_values = sum(int(np.prod(shape)) for k, shape in audit[0]["tensors"].items() if k.startswith("head."))
        assert all(b < 0.55 * 4 * values for b in received)  # float16 on the wire: about 2 bytes per value
        # down: the shared model and both banked heads, also in float16
        assert all(b < 0.55 * 4 * (values + head_values) for b in sent_down[site])
