"""The local step, the trainer's federation interface and the server maths, without FLARE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcfed.ops.federation import build_trainers, run_federation
from lcfed.runtime.aggregation import HeadBankAggregation
from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import make_config
from lcfed.runtime.contract import BANK_PREFIX, ContractViolation, bank_key
from lcfed.runtime.data.pipeline import load_site
from lcfed.runtime.losses import soft_dice_loss
from lcfed.runtime.trainer import CheckpointMismatch, SiteTrainer


def snapshot(model: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    state = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, state[k])}


BODY = ("encoder.", "pcs.", "decoder.")


@pytest.fixture
def trainer(tiny_data):
    cfg = make_config("tiny", iterations=4, personal_iterations=2)
    data = load_site(tiny_data, "site-a", cfg.size)
    return SiteTrainer(get_algorithm("lcfed-joint"), cfg, data, ["site-a", "site-b", "site-c"], "site-a")


def batch(trainer, n=2):
    train = trainer.data.splits["training"]
    return train.images[:n], train.labels[:n]


def test_soft_dice_is_batch_level_and_class_averaged():
    p = torch.zeros(2, 2, 2, 2)
    y = torch.zeros(2, 2, 2, 2)
    p[0, 0, 0, 0] = 1.0
    y[0, 0, 0, 0] = 1.0  # class 0 perfect
    y[1, 1, 0, 0] = 1.0  # class 1 missed entirely
    expected = 1 - ((2 + 1e-5) / (2 + 1e-5) + (1e-5) / (1 + 1e-5)) / 2
    assert float(soft_dice_loss(p, y)) == pytest.approx(expected, abs=1e-6)


def test_head_only_iterations_leave_shared_parameters_unchanged(trainer):
    image, label = batch(trainer)
    body, head, hc = (
        snapshot(trainer.model, BODY),
        snapshot(trainer.model, ("head.",)),
        snapshot(trainer.model, ("hc.",)),
    )
    trainer.algorithm.train_step(trainer.ctx, image, label, iteration=0, round_idx=0)  # personal phase
    assert changed(body, trainer.model) == set()
    assert changed(head, trainer.model) == set(head)
    assert changed(hc, trainer.model) >= {"hc.conv.weight", "hc.conv.bias"}  # joint HC step


def test_shared_iterations_leave_the_head_unchanged(trainer):
    image, label = batch(trainer)
    body, head = snapshot(trainer.model, BODY), snapshot(trainer.model, ("head.",))
    trainer.algorithm.train_step(trainer.ctx, image, label, iteration=3, round_idx=0)  # shared phase
    assert changed(head, trainer.model) == set()
    # every shared parameter moves, PCS included (Dice + contrastive term)
    assert changed(body, trainer.model) == set(body)
    assert any(k.startswith("pcs.") for k in changed(body, trainer.model))


def test_staged_schedule_trains_only_hc_after_start_round(tiny_data):
    cfg = make_config("tiny", rounds=2, hc_rounds=2)
    data = load_site(tiny_data, "site-b", cfg.size)
    t = SiteTrainer(get_algorithm("lcfed"), cfg, data, ["site-a", "site-b", "site-c"], "site-b")
    assert t.total_rounds == 4 and cfg.hc_start_round == 2  # the HC rounds come after the network budget
    image, label = batch(t)
    assert not bool(t.model.hc.trained)
    t.algorithm.train_step(t.ctx, image, label, iteration=5, round_idx=1)  # the last network round
    assert not bool(t.model.hc.trained)  # the prediction is still P_i
    net = snapshot(t.model, (*BODY, "head."))
    hc = snapshot(t.model, ("hc.conv",))
    # a frozen network stays the site's own: the global body of an HC-only round is not merged ...
    glob = {k: np.zeros(tuple(v.shape), np.float32) for k, v in t.model.state_dict().items() if t.contract.is_shared(k)}
    t.receive(glob, round_idx=2)
    assert changed(net, t.model) == set()
    # ... while in a network round it is
    t.receive(glob, round_idx=1)
    assert changed(net, t.model) == {k for k in net if not k.startswith("head.")}
    t.model.load_state_dict(net, strict=False)
    t.algorithm.train_step(t.ctx, image, label, iteration=5, round_idx=2)
    assert changed(net, t.model) == set()
    assert changed(hc, t.model) == set(hc)
    assert bool(t.model.hc.trained)


def test_hc_rounds_default_to_a_quarter_of_the_network_rounds_and_only_staged_hc_adds_them():
    assert [make_config(p).hc_stage_rounds for p in ("paper", "demo", "tiny")] == [75, 4, 1]
    assert make_config("demo", rounds=48).hc_stage_rounds == 12  # follows an overridden budget
    assert make_config("demo", hc_rounds=0).hc_stage_rounds == 0
    cfg = make_config("demo")
    totals = {name: get_algorithm(name).total_rounds(cfg) for name in ("lcfed", "lcfed-pn", "lcfed-joint")}
    assert totals == {"lcfed": 20, "lcfed-pn": 20, "lcfed-joint": 16}
    # every other algorithm trains its network for exactly `rounds`
    for name in ("lcfed-no-hc", "lcfed-pn-no-hc", "fedrep", "fedavg", "fedbn", "ditto", "local"):
        assert get_algorithm(name).total_rounds(cfg) == 16, name
    with pytest.raises(ValueError, match="hc_rounds"):
        make_config("demo", hc_rounds=-1)
    with pytest.raises(ValueError, match="hc_start_fraction"):
        make_config("demo", hc_start_fraction=0.75)  # replaced by hc_rounds: an old option fails loudly


def test_hc_has_its_own_learning_rate(tiny_data):
    data = load_site(tiny_data, "site-a", 32)
    for hc_lr, expected in ((None, 1e-3), (3e-3, 3e-3)):
        cfg = make_config("tiny", hc_lr=hc_lr)
        t = SiteTrainer(get_algorithm("lcfed"), cfg, data, ["site-a", "site-b", "site-c"], "site-a")
        lrs = {name: opt.param_groups[0]["lr"] for name, opt in t.ctx.optimizers.items()}
        assert lrs == {"body": 1e-3, "head": 1e-3, "hc": expected}


def test_hc_rounds_send_only_the_head_and_the_server_keeps_the_global_model(tiny_data):
    """Staged HC: a site sends its head only; the server's shared model stays what it was."""
    cfg = make_config("tiny", rounds=1, hc_rounds=1, iterations=2, personal_iterations=1)
    trainers = build_trainers("lcfed", tiny_data, cfg)
    agg = HeadBankAggregation(trainers[0].contract, trainers[0].model_keys())
    sizes = {}
    for r in range(trainers[0].total_rounds):
        agg.reset()
        for t in trainers:
            t.train_round(r)
            sent = t.outgoing()
            sizes.setdefault(r, sum(v.nbytes for v in sent.values()))
            agg.accept(t.site, sent)
        merged = agg.result()
        if r == 0:
            network_round = merged
            assert set(sent) == {k for k in t.model_keys() if not k.startswith("hc.")}
        for t in trainers:
            t.receive(merged, r + 1)
    assert set(sent) == {"head.weight", "head.bias"}  # the HC round's message
    shared = trainers[0].contract.shared_keys(trainers[0].model_keys())
    assert shared and all(np.array_equal(merged[k], network_round[k]) for k in shared)
    assert {k for k in merged if k.startswith(BANK_PREFIX)} == {k for k in network_round if k.startswith(BANK_PREFIX)}
    # the HC round's message is the head: a few hundred bytes of values against the whole body
    head_bytes = sum(p.numel() * 4 for p in trainers[0].model.head.parameters())
    assert sizes[1] == head_bytes and sizes[0] > 100 * sizes[1]
    # the trainer refuses a head-only message in a network round and a full one in an HC round
    t = trainers[0]
    with pytest.raises(ContractViolation, match="missing"):
        t.contract.check_outgoing(["head.weight", "head.bias"], t.model_keys(), t.site)
    with pytest.raises(ContractViolation, match="only its head"):
        t.contract.check_outgoing(t.contract.outgoing_keys(t.model_keys()), t.model_keys(), t.site, head_only=True)


def test_batchnorm_is_frozen_in_the_hc_rounds_of_lcfed_pn(tiny_data):
    cfg = make_config("tiny", rounds=1, hc_rounds=1)
    t = build_trainers("lcfed-pn", tiny_data, cfg, sites=["site-a", "site-b", "site-c"])[0]
    t.train_round(0)
    norms = snapshot(t.model, ("encoder.", "decoder."))
    assert any(k.endswith(".norm.running_mean") for k in norms)
    t.train_round(1)  # HC only: the network, running statistics included, is frozen
    assert changed(norms, t.model) == set()
    assert bool(t.model.hc.trained) and t.model.training


def test_aggregation_of_head_only_rounds_keeps_the_shared_model_and_refuses_a_mix():
    shapes = model_shapes()
    contract = get_algorithm("lcfed").contract
    outgoing = {k: s for k, s in shapes.items() if k in set(contract.outgoing_keys(shapes))}
    heads = {k: s for k, s in shapes.items() if contract.is_banked(k)}
    shared = contract.shared_keys(shapes)
    agg = HeadBankAggregation(contract, shapes)
    # no global model known yet: a head-only round has nothing to keep
    agg.accept("a", fake_result(heads, 1.0))
    with pytest.raises(RuntimeError, match="no previous global shared model"):
        agg.result()
    agg.reset()
    for i, site in enumerate(["a", "b"]):
        agg.accept(site, fake_result(outgoing, float(i)))
    first = agg.result()
    agg.reset()
    for i, site in enumerate(["a", "b"]):
        agg.accept(site, fake_result(heads, 10.0 + i))
    second = agg.result()
    assert all(np.array_equal(second[k], first[k]) for k in shared)  # unchanged
    assert np.all(second[bank_key("b", "head.weight")] == 11.0)  # the bank takes the new heads
    # a caller's previous global model wins over the remembered one
    agg.reset()
    agg.accept("a", fake_result(heads, 0.0))
    prev = {k: np.full(shapes[k], 7.0, np.float32) for k in shared}
    assert all(np.all(v == 7.0) for k, v in agg.result(previous=prev).items() if k in set(shared))
    # some sites frozen, others not: refused, naming them
    agg.reset()
    agg.accept("a", fake_result(outgoing, 0.0))
    agg.accept("b", fake_result(heads, 0.0))
    with pytest.raises(ContractViolation, match=r"\['b'\] sent only their head while \['a'\]"):
        agg.result()


def test_outgoing_is_shared_plus_head_never_hc(trainer):
    out = trainer.outgoing()
    keys = set(out)
    assert {"head.weight", "head.bias"} <= keys
    assert not any(k.startswith("hc.") for k in keys)
    assert keys == {k for k in trainer.model_keys() if not k.startswith("hc.")}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.values())


def test_receive_merges_shared_and_keeps_personal(trainer):
    image, label = batch(trainer)
    trainer.train_round(0)
    personal = snapshot(trainer.model, ("head.", "hc."))
    glob = {
        k: np.full(v.shape, 0.5, np.float32)
        for k, v in trainer.model.state_dict().items()
        if trainer.contract.is_shared(k)
    }
    glob[bank_key("site-b", "head.weight")] = np.ones_like(trainer.model.head.weight.detach().numpy())
    glob[bank_key("site-b", "head.bias")] = np.ones(trainer.model.head.bias.shape, np.float32)
    trainer.receive(glob)
    state = trainer.model.state_dict()
    assert all(torch.all(state[k] == 0.5) for k in glob if not k.startswith(BANK_PREFIX))
    assert changed(personal, trainer.model) == set()
    assert trainer.ctx.head_bank.sites() == ["site-b"]


def test_receive_rejects_personal_unknown_and_misshapen_keys(trainer):
    with pytest.raises(ContractViolation, match="personal"):
        trainer.receive({"hc.conv.bias": np.zeros(2, np.float32)})
    with pytest.raises(ContractViolation, match="unknown"):
        trainer.receive({"nonsense.weight": np.zeros(2, np.float32)})
    glob = {k: v.numpy() for k, v in trainer.model.state_dict().items() if trainer.contract.is_shared(k)}
    glob["pcs.embed.0.weight"] = np.zeros((64, 5, 1, 1), np.float32)  # a 5-site model
    with pytest.raises(ValueError, match="pcs.embed.0.weight"):
        trainer.receive(glob)


def test_site_not_in_list_and_duplicate_sites_fail(tiny_data):
    cfg = make_config("tiny")
    data = load_site(tiny_data, "site-a", cfg.size)
    with pytest.raises(ValueError, match="not in the job's site list"):
        SiteTrainer(get_algorithm("lcfed"), cfg, data, ["site-b", "site-c"], "site-a")
    with pytest.raises(ValueError, match="more than once"):
        SiteTrainer(get_algorithm("lcfed"), cfg, data, ["site-a", "site-a"], "site-a")


# -- server maths ----------------------------------------------------------------------------------
def fake_result(keys_shapes, value):
    return {k: np.full(s, value, np.float32) for k, s in keys_shapes.items()}


def model_shapes(algo="lcfed"):
    from lcfed.runtime.algorithms import ModelSpec

    model = get_algorithm(algo).build_model(ModelSpec(1, 2, 3, 4))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_aggregation_averages_shared_and_banks_heads():
    shapes = model_shapes()
    contract = get_algorithm("lcfed").contract
    agg = HeadBankAggregation(contract, shapes)
    outgoing = {k: s for k, s in shapes.items() if k in set(contract.outgoing_keys(shapes))}
    for i, site in enumerate(["a", "b", "c"]):
        agg.accept(site, fake_result(outgoing, float(i)), n_samples=10 * (i + 1))
    out = agg.result()
    for k in contract.shared_keys(shapes):
        assert np.allclose(out[k], 1.0)  # uniform mean of 0, 1, 2
    assert "head.weight" not in out and not any(k.startswith("hc.") for k in out)
    for i, site in enumerate(["a", "b", "c"]):
        assert np.all(out[bank_key(site, "head.weight")] == float(i))  # banked, not averaged
    assert len([k for k in out if k.startswith(BANK_PREFIX)]) == 3 * 2

    weighted = HeadBankAggregation(contract, shapes, weighting="samples")
    for i, site in enumerate(["a", "b", "c"]):
        weighted.accept(site, fake_result(outgoing, float(i)), n_samples=10 * (i + 1))
    k = contract.shared_keys(shapes)[0]
    assert np.allclose(weighted.result()[k], (0 * 10 + 1 * 20 + 2 * 30) / 60)


def test_aggregation_raises_on_empty_round_and_on_contract_breach():
    shapes = model_shapes()
    contract = get_algorithm("lcfed").contract
    agg = HeadBankAggregation(contract, shapes)
    with pytest.raises(RuntimeError, match="no client result"):
        agg.result()
    leaking = fake_result(shapes, 0.0)  # everything, HC included
    with pytest.raises(ContractViolation, match="site 'b'.*never leave"):
        agg.accept("b", leaking)
    outgoing = {k: s for k, s in shapes.items() if k in set(contract.outgoing_keys(shapes))}
    partial = fake_result(outgoing, 0.0)
    partial.pop("decoder.blocks.0.fuse.conv.weight")
    with pytest.raises(ContractViolation, match="missing"):
        agg.accept("c", partial)


def test_stale_heads_are_kept_unless_dropped():
    shapes = model_shapes()
    contract = get_algorithm("lcfed").contract
    outgoing = {k: s for k, s in shapes.items() if k in set(contract.outgoing_keys(shapes))}
    for drop, expect in ((False, {"a", "b"}), (True, {"a"})):
        agg = HeadBankAggregation(contract, shapes, drop_stale_heads=drop)
        agg.accept("a", fake_result(outgoing, 0.0))
        agg.accept("b", fake_result(outgoing, 1.0))
        agg.result()
        agg.reset()
        agg.accept("a", fake_result(outgoing, 2.0))  # b dropped out this round
        sites = {k.split("/")[1] for k in agg.result() if k.startswith(BANK_PREFIX)}
        assert sites == expect


# -- a whole (tiny) federation ---------------------------------------------------------------------
def test_in_process_federation_trains_and_checkpoints_resume_exactly(tiny_data, tmp_path):
    cfg = make_config("tiny", iterations=4, personal_iterations=1)
    trainers = build_trainers("lcfed", tiny_data, cfg)
    init = {k: v.clone() for k, v in trainers[0].model.state_dict().items()}
    records = run_federation(trainers, rounds=2, log=None)
    assert len(records) == 2
    moved = [k for k, v in trainers[0].model.state_dict().items() if k.startswith(BODY) and not torch.equal(v, init[k])]
    assert moved, "shared weights never changed"
    # every site got every other site's head
    for t in trainers:
        assert t.ctx.head_bank.sites() == ["site-a", "site-b", "site-c"]

    # a checkpoint restores model, optimizer, sampler and bank: the next round is identical
    t = trainers[1]
    t.save(tmp_path / "ckpt.pt")
    twin = build_trainers("lcfed", tiny_data, cfg, sites=["site-a", "site-b", "site-c"])[1]
    twin.load(tmp_path / "ckpt.pt")
    a, b = t.train_round(), twin.train_round()
    losses = [k for k in a if k.endswith("loss")]
    assert losses and all(a[k] == b[k] for k in losses)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, twin.model.state_dict()[k]), k


def test_checkpoint_from_another_configuration_is_refused(tiny_data, tmp_path):
    cfg = make_config("tiny")
    t = build_trainers("lcfed", tiny_data, cfg, sites=["site-a", "site-b", "site-c"])[0]
    t.save(tmp_path / "ckpt.pt")
    other = build_trainers("fedavg", tiny_data, cfg, sites=["site-a", "site-b", "site-c"])[0]
    with pytest.raises(CheckpointMismatch, match="algorithm"):
        other.load(tmp_path / "ckpt.pt")
    wider = build_trainers("lcfed", tiny_data, make_config("tiny", width=6), sites=["site-a", "site-b", "site-c"])[0]
    with pytest.raises(CheckpointMismatch, match="width"):
        wider.load(tmp_path / "ckpt.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="cannot read"):
        t.load(tmp_path / "garbage.pt")


def test_same_seed_same_result(tiny_data):
    cfg = make_config("tiny")
    runs = []
    for _ in range(2):
        t = build_trainers("lcfed", tiny_data, cfg, sites=["site-a", "site-b", "site-c"])[2]
        t.train_round(0)
        runs.append(t.outgoing())
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


def test_mixed_precision_is_chosen_for_cuda_only(monkeypatch):
    from lcfed.runtime.algorithms.base import Precision

    cpu = Precision(torch.device("cpu"))
    assert not cpu.enabled and cpu.dtype is None and not cpu.scaler.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert Precision(torch.device("cuda")).dtype == torch.bfloat16  # bf16: no loss scaling needed
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert Precision(torch.device("cuda")).dtype == torch.float16  # fp16: with a GradScaler on a real GPU
    assert not Precision(torch.device("cuda"), enabled=False).enabled  # the config's amp=False wins


def test_batchnorm_state_is_averaged_by_fedavg_bn_and_kept_per_site_by_fedbn(tiny_data):
    cfg = make_config("tiny", iterations=2)
    for name, same in (("fedavg-bn", True), ("fedbn", False)):
        trainers = build_trainers(name, tiny_data, cfg, sites=["site-a", "site-b", "site-c"])
        agg = HeadBankAggregation(trainers[0].contract, trainers[0].model_keys())
        for t in trainers:
            t.train_round(0)
            agg.accept(t.site, t.outgoing())
        merged = agg.result()
        for t in trainers:
            t.receive(merged, 1)
        states = [t.model.state_dict() for t in trainers]
        stats = [k for k in states[0] if k.endswith((".norm.running_mean", ".norm.weight"))]
        assert len(stats) > 10
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in stats) == same, name
        assert any(k.endswith(".norm.running_mean") for k in merged) == same, name
        # the convolutions are shared by both: equal after the server's average
        convs = [k for k in states[0] if k.endswith(".conv.weight")]
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in convs), name


def test_private_embedding_variant_keeps_the_site_embedding_at_the_site_and_averages_the_rest_of_pcs(tiny_data):
    cfg = make_config("tiny", iterations=3, personal_iterations=1, rounds=4)  # round 1 is a network round
    for name, shared in (("lcfed", True), ("lcfed-private-embedding", False)):
        trainers = build_trainers(name, tiny_data, cfg, sites=["site-a", "site-b", "site-c"])
        agg = HeadBankAggregation(trainers[0].contract, trainers[0].model_keys())
        for t in trainers:
            t.train_round(0)
            sent = t.outgoing()
            assert any(k.startswith("pcs.mlp.") for k in sent), name
            assert any(k.startswith("pcs.embed.") for k in sent) == shared, name
            agg.accept(t.site, sent)
        merged = agg.result()
        for t in trainers:
            t.receive(merged, 1)
        states = [t.model.state_dict() for t in trainers]
        mlp = [k for k in states[0] if k.startswith("pcs.mlp.")]
        embed = [k for k in states[0] if k.startswith("pcs.embed.")]
        assert mlp and embed
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in mlp), name  # g averaged
        # the embedding is averaged only where the method shares it; otherwise each site trained its own
        assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in embed) == shared, name


def _captured_losses(trainer: SiteTrainer) -> list[torch.Tensor]:
    """Make the trainer's optimiser steps record their loss instead of stepping (to differentiate it here)."""
    losses: list[torch.Tensor] = []
    trainer.ctx.precision.step = lambda loss, model, optimizer: losses.append(loss)
    return losses


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_fedprox_step_adds_a_proximal_gradient_mu_times_the_distance_to_the_global_model(tiny_data):
    mu = 0.5
    t = build_trainers("fedprox", tiny_data, make_config("tiny", fedprox_mu=mu), sites=["site-a", "site-b"])[0]
    t.algorithm.on_round_start(t.ctx, 0)  # the global model as received this round
    anchor = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _perturb(t.model)  # as after some local steps
    losses = _captured_losses(t)
    image, label = batch(t)
    t.algorithm.train_step(t.ctx, image, label, 0, 0)
    names, params = zip(*t.model.named_parameters())
    full = torch.autograd.grad(losses[0], params)
    dice_only = torch.autograd.grad(t.algorithm.loss(t.ctx, image, label), params, allow_unused=True)
    for name, p, g, d in zip(names, params, full, dice_only):
        expected = mu * (p.detach() - anchor[name])
        torch.testing.assert_close(g - (d if d is not None else 0), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_ditto_pulls_the_personal_model_toward_the_global_one(tiny_data):
    lam = 2.0
    t = build_trainers("ditto", tiny_data, make_config("tiny", ditto_lambda=lam), sites=["site-a", "site-b"])[0]
    t.algorithm.on_round_start(t.ctx, 0)
    anchor = {n: p.detach().clone() for n, p in t.model.global_net.named_parameters()}
    _perturb(t.model.personal_net)  # the personal model has moved away from the global one
    losses = _captured_losses(t)
    image, label = batch(t)
    t.algorithm.train_step(t.ctx, image, label, 0, 0)
    assert len(losses) == 2  # one step of the global model (plain Dice), one of the personal model
    names, params = zip(*t.model.personal_net.named_parameters())
    personal = torch.autograd.grad(losses[1], params)
    assert all(g is None for g in torch.autograd.grad(losses[0], params, allow_unused=True))  # global step
    dice = soft_dice_loss(torch.sigmoid(t.model.personal_net(image)), label)
    dice_grads = torch.autograd.grad(dice, params)
    for name, p, g, d in zip(names, params, personal, dice_grads):
        pull = g - d  # the proximal part: lambda (w_personal - w_global), so a descent step moves toward global
        torch.testing.assert_close(pull, lam * (p.detach() - anchor[name]), rtol=1e-4, atol=1e-6, msg=name)
    assert any(float((p.detach() - anchor[n]).abs().max()) > 0 for n, p in zip(names, params))
