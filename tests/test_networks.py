"""The network, PCS and the contrastive term at the level of their maths (method.md sections 2-4)."""

from __future__ import annotations

import pytest
import torch

from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.networks import LCFedUNet, PersonalizedChannelSelection, contrastive_site_loss


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_preset_parameter_count():
    # 1 channel, 1 class, n=16: the paper's "about 3.2 M parameters"
    model = LCFedUNet(in_channels=1, n_classes=1, width=16, n_sites=6)
    assert 3.1e6 <= n_params(model) <= 3.3e6


def test_unet_shapes_and_feature_width():
    model = LCFedUNet(in_channels=3, n_classes=2, width=4, n_sites=3)
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x, 1)
    assert feats.feature.shape == (2, 8, 32, 32)  # F has 2n channels at full resolution
    assert feats.bottleneck.shape == (2, 64, 2, 2)  # 16n channels at 1/16
    assert feats.attention.shape == (2, 64, 1, 1)
    assert model(x, 1).shape == (2, 2, 32, 32)


def test_instance_norm_holds_no_parameters():
    model = LCFedUNet(1, 1, 4, 2, use_pcs=False, use_hc=False)
    assert not any(".norm." in k for k in model.state_dict())
    bn = LCFedUNet(1, 1, 4, 2, norm="batch", use_pcs=False, use_hc=False)
    assert any(k.endswith(".norm.running_mean") for k in bn.state_dict())


@pytest.mark.parametrize(
    "other",
    ["lcfed-no-pcs", "lcfed-no-hc", "lcfed-pn", "lcfed-pn-no-hc", "fedavg", "fedbn", "fedrep", "ditto", "local"],
)
def test_same_seed_same_initial_body_for_every_algorithm(other):
    """A paired benchmark: at one seed every algorithm starts from the same U-Net body and head."""
    from lcfed.runtime.algorithms import ModelSpec
    from lcfed.runtime.trainer import seed_everything

    spec = ModelSpec(in_channels=1, n_classes=2, n_sites=3, width=4)
    seed_everything(5)
    ref = get_algorithm("lcfed").build_model(spec).state_dict()
    seed_everything(5)
    torch.rand(7)  # RNG draws before the build change nothing either
    sd = get_algorithm(other).build_model(spec).state_dict()
    sd = {k.removeprefix("global_net."): v for k, v in sd.items() if not k.startswith("personal_net.")}
    body = [k for k in ref if k.startswith(("encoder.", "decoder.", "head.")) and k in sd]
    assert len([k for k in body if k.endswith(".weight")]) >= 20
    assert all(torch.equal(ref[k], sd[k]) for k in body)
    seed_everything(6)
    other_seed = get_algorithm("lcfed").build_model(spec).state_dict()
    first = "encoder.blocks.0.convs.0.conv.weight"
    assert not torch.equal(other_seed[first], ref[first])


def test_kaiming_init_scale():
    from lcfed.runtime.networks.unet import kaiming_init

    conv = torch.nn.Conv2d(64, 128, 3)
    kaiming_init(conv, seed=0)
    fan_in = 64 * 9
    assert abs(conv.weight.std().item() - (2.0 / fan_in) ** 0.5) < 0.02 * (2.0 / fan_in) ** 0.5
    assert torch.count_nonzero(conv.bias) == 0


def test_pcs_soft_gate_formula():
    torch.manual_seed(0)
    pcs = PersonalizedChannelSelection(channels=32, n_sites=3, reduction=16)
    f = torch.randn(2, 32, 4, 4)
    site = torch.tensor([2, 2])
    out, m = pcs(f, site)
    # M = sigmoid(g([avg; xi]) + g([max; xi])), f' = f * (1 + M)
    onehot = torch.zeros(2, 3, 1, 1)
    onehot[:, 2] = 1
    xi = pcs.embed(onehot)
    avg = f.mean(dim=(2, 3), keepdim=True)
    mx = f.amax(dim=(2, 3), keepdim=True)
    expected = torch.sigmoid(pcs.mlp(torch.cat([avg, xi], 1)) + pcs.mlp(torch.cat([mx, xi], 1)))
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(out, f * (1 + expected))
    # the site changes the gate
    _, m0 = pcs(f, torch.tensor([0, 0]))
    assert not torch.allclose(m0, m)


def test_pcs_parameters_receive_gradients_from_contrastive_term_and_change():
    torch.manual_seed(0)
    model = LCFedUNet(1, 1, 4, n_sites=3)
    x = torch.randn(2, 1, 32, 32)
    feats = model.features(x, 1)
    loss = contrastive_site_loss(model.pcs, feats.bottleneck, site=1)
    model.zero_grad()
    loss.backward()
    pcs_grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("pcs.")}
    assert pcs_grads and all(g is not None and g.abs().sum() > 0 for g in pcs_grads.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("pcs.")}
    torch.optim.Adam(model.pcs.parameters(), lr=1e-2).step()
    for n, p in model.named_parameters():
        if n.startswith("pcs."):
            assert not torch.equal(before[n], p.detach()), n


def test_contrastive_gradient_reaches_only_pcs():
    torch.manual_seed(0)
    model = LCFedUNet(1, 1, 4, n_sites=3)
    feats = model.features(torch.randn(2, 1, 32, 32), 0)
    model.zero_grad()
    contrastive_site_loss(model.pcs, feats.bottleneck, site=0).backward()
    for n, p in model.named_parameters():
        if n.startswith("pcs."):
            continue
        assert p.grad is None or p.grad.abs().sum() == 0, f"{n} received a contrastive gradient"


def test_contrastive_value_is_minus_mean_mse_to_other_sites():
    torch.manual_seed(0)
    pcs = PersonalizedChannelSelection(16, n_sites=3, reduction=4)
    f = torch.randn(2, 16, 2, 2)
    loss = contrastive_site_loss(pcs, f, site=1)
    m = [pcs.attention(f, torch.full((2,), k)) for k in range(3)]
    expected = -0.5 * (((m[1] - m[0]) ** 2).mean() + ((m[1] - m[2]) ** 2).mean())
    torch.testing.assert_close(loss, expected)
    # one site: no other embedding to push away from
    single = PersonalizedChannelSelection(16, n_sites=1, reduction=4)
    assert float(contrastive_site_loss(single, f, site=0)) == 0.0


@pytest.mark.parametrize(
    "name,personal,banked",
    [
        (
            "lcfed",
            {"head.weight", "head.bias", "hc.trained", "hc.conv.weight", "hc.conv.bias"},
            {"head.weight", "head.bias"},
        ),
        (
            "lcfed-joint",
            {"head.weight", "head.bias", "hc.trained", "hc.conv.weight", "hc.conv.bias"},
            {"head.weight", "head.bias"},
        ),
        (
            "lcfed-private-embedding",
            {"head.weight", "head.bias", "hc.trained", "hc.conv.weight", "hc.conv.bias"}
            | {"pcs.embed.0.weight", "pcs.embed.2.weight"},
            {"head.weight", "head.bias"},
        ),
        (
            "lcfed-pn",
            {"head.weight", "head.bias", "hc.trained", "hc.conv.weight", "hc.conv.bias"} | {"<every .norm. key>"},
            {"head.weight", "head.bias"},
        ),
        ("lcfed-pn-no-hc", {"head.weight", "head.bias"} | {"<every .norm. key>"}, set()),
        ("fedavg", set(), set()),
        ("fedavg-bn", set(), set()),
    ],
)
def test_personal_key_set(name, personal, banked):
    from lcfed.runtime.algorithms import ModelSpec

    algo = get_algorithm(name)
    model = algo.build_model(ModelSpec(1, 2, 3, 4))
    keys = list(model.state_dict())
    if "<every .norm. key>" in personal:
        norms = {k for k in keys if ".norm." in k}
        assert any(k.endswith(".norm.running_mean") for k in norms) and any(k.endswith(".norm.bias") for k in norms)
        personal = (personal - {"<every .norm. key>"}) | norms
    assert {k for k in keys if algo.contract.is_personal(k)} == personal
    assert set(algo.contract.banked_keys(keys)) == banked
    # what leaves the site: every shared key and the banked head, never a private key
    outgoing = set(algo.contract.outgoing_keys(keys))
    assert outgoing == (set(keys) - personal) | banked
    # PCS is shared (averaged) as the method specifies; only the off-spec variant keeps its site embedding home
    pcs = {k for k in keys if k.startswith("pcs.")}
    kept_home = {"pcs.embed.0.weight", "pcs.embed.2.weight"} if name == "lcfed-private-embedding" else set()
    assert pcs - outgoing == kept_home


def test_fedbn_and_lcfed_pn_keep_batchnorm_at_the_site_and_fedavg_bn_averages_it():
    from lcfed.runtime.algorithms import ModelSpec

    for name, bn_personal in (("fedbn", True), ("fedavg-bn", False), ("lcfed-pn", True), ("lcfed-pn-no-hc", True)):
        algo = get_algorithm(name)
        keys = list(algo.build_model(ModelSpec(1, 2, 3, 4)).state_dict())
        norm = [k for k in keys if ".norm." in k]
        assert any(k.endswith("running_var") for k in norm) and any(k.endswith(".norm.weight") for k in norm)
        assert all(algo.contract.is_personal(k) == bn_personal for k in norm), name
        body_convs = [k for k in keys if ".conv." in k and k.startswith(("encoder.", "decoder."))]
        assert body_convs and all(algo.contract.is_shared(k) for k in body_convs), name


def test_pcs_attention_is_fp32_under_bf16_autocast():
    """The contrastive term compares near-equal attentions of different sites: they are computed in fp32."""
    torch.manual_seed(0)
    pcs = PersonalizedChannelSelection(32, n_sites=3, reduction=4)
    f = torch.randn(2, 32, 4, 4).bfloat16()
    site = torch.tensor([1, 1])
    reference = pcs.attention(f.float(), site)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        m = pcs.attention(f, site)
        gated, _ = pcs(f, site)
        con = contrastive_site_loss(pcs, f, site=1)
    assert m.dtype == torch.float32 and torch.equal(m, reference)
    assert gated.dtype == torch.bfloat16  # the decoder keeps running in low precision
    assert con.dtype == torch.float32
    torch.testing.assert_close(con, contrastive_site_loss(pcs, f.float(), site=1), rtol=0, atol=0)
