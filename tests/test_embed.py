"""Closed-form placement: the metric it minimises is the real one, and it beats minimal norm."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from wmtrace import example, modelio
from wmtrace.coding import codes, keys
from wmtrace.data import load_fashion_mnist
from wmtrace.schemes.whitebox import carriers as carriers_mod
from wmtrace.schemes.whitebox import embed


@pytest.mark.parametrize("padding,stride", [(1, 1), (0, 2), ("same", 1), ("valid", 1)])
def test_conv_patches_reproduce_the_convolution(padding, stride):
    conv = nn.Conv2d(3, 5, 3, padding=padding, stride=stride, bias=False)
    x = torch.randn(2, 3, 9, 9)
    p = embed._patches(conv, x)  # (N * positions) x (in * k * k), rows in the weight's layout
    want = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(p @ conv.weight.reshape(5, -1).T, want, atol=1e-5)


def test_linear_patches_and_unsupported_layers():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    assert torch.equal(embed._patches(lin, x), x.reshape(10, 4))
    assert embed._patches(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5)) is None


@pytest.mark.parametrize("signed", [False, True])
def test_change_meets_every_margin_and_minimises_its_metric(signed):
    rng = np.random.default_rng(0)
    bits, rows, dim = 16, 12, 64
    x = rng.standard_normal((bits, dim))
    signs = rng.choice([-1.0, 1.0], (bits, rows)) if signed else np.ones((bits, rows))
    secret = carriers_mod.Secret(x, signs)
    targets = 8.0 * np.sign(rng.standard_normal(bits))
    a = rng.standard_normal((dim, dim))
    metric = a @ a.T + 0.1 * np.eye(dim)

    def cost(d):
        return float(np.einsum("id,de,ie->", d, metric, d))

    for m in (None, metric):
        assert np.allclose(secret.read(carriers_mod.embedding_map(secret, m).change(targets)), targets)
    plain = carriers_mod.embedding_map(secret).change(targets)
    weighted = carriers_mod.embedding_map(secret, metric).change(targets)
    assert cost(weighted) < cost(plain)
    # Any other change meeting the same targets costs more in the metric.
    constraints = (signs[:, :, None] * x[:, None, :]).reshape(bits, -1) / rows
    e = rng.standard_normal(rows * dim)
    e -= constraints.T @ np.linalg.lstsq(constraints.T, e, rcond=None)[0]
    other = weighted + 0.01 * e.reshape(rows, dim)
    assert np.allclose(secret.read(other), targets) and cost(other) > cost(weighted)
    spread = np.linalg.norm(weighted - weighted.mean(0), axis=1).mean() / np.linalg.norm(weighted, axis=1).mean()
    if signed:  # many keyed rank-one terms: filters move differently, and their mean hardly at all
        assert spread > 0.9
    else:  # the paper's statistic: one shift shared by every filter
        assert spread < 1e-9


def test_signed_carrier_secrets_are_keyed_and_plain_ones_are_the_filter_mean():
    key = keys.generate()
    plain = carriers_mod.Carrier("w", (32, 8, 3, 3), 0, 16)
    signed = carriers_mod.Carrier("w", (32, 8, 3, 3), 0, 16, signed=True)
    assert np.array_equal(plain.secret(key).signs, np.ones((16, 32)))
    s = signed.secret(key).signs
    assert set(np.unique(s)) == {-1.0, 1.0} and np.array_equal(s, signed.secret(key).signs)
    assert not np.array_equal(s, signed.secret(keys.generate()).signs)
    # Balanced: fixed key, so deterministic; 32,768 signs (std of the mean 0.0055).
    big = carriers_mod.Carrier("w", (256, 64), 0, 128, signed=True).secret(bytes(range(32))).signs
    assert abs(big.mean()) < 0.03
    assert carriers_mod.Carrier.from_dict(signed.to_dict()) == signed
    legacy = plain.to_dict()
    del legacy["signed"]  # registries written before signed carriers
    assert carriers_mod.Carrier.from_dict(legacy) == plain


def test_activation_placement_changes_outputs_less_than_minimal_norm(master_file):
    model = example.build()
    model.load_state_dict(load_file(str(master_file)))
    model.eval()
    state = model.state_dict()
    carriers = carriers_mod.select(state, 256)
    key = keys.generate()
    assert all(c.signed for c in carriers)
    xs = [c.secret(key) for c in carriers]
    margins = [embed.margin(state[c.name], c, 0.1) for c in carriers]
    bits = codes.codeword(key, "m", 1, codes.CodeSpec())
    train, _ = load_fashion_mnist("train", limit=512)
    metrics = embed.input_moments(model, carriers, train, ridge=0.1)
    assert all(m is not None and m.shape == (c.dim, c.dim) for m, c in zip(metrics, carriers, strict=True))

    held_out, _ = load_fashion_mnist("test", limit=256)
    inputs = {}

    def keep(mod, args, out, name):
        inputs[name] = args[0]

    hooks = [model.get_submodule(c.name.rpartition(".")[0]).register_forward_hook(
        lambda mod, args, out, n=c.name: keep(mod, args, out, n)) for c in carriers]
    with torch.no_grad():
        model(held_out)
    for h in hooks:
        h.remove()

    def output_change(placed: dict) -> list[float]:
        out = []
        for c in carriers:
            conv = model.get_submodule(c.name.rpartition(".")[0])
            diff = placed[c.name] - state[c.name]
            out.append(float(F.conv2d(inputs[c.name], diff, padding=conv.padding).pow(2).mean()))
        return out

    plain = {k: v.clone() for k, v in state.items()}
    embed.place(plain, carriers, xs, margins, bits)
    aware = {k: v.clone() for k, v in state.items()}
    embed.place(aware, carriers, xs, margins, bits, metrics)
    for p, a in zip(output_change(plain), output_change(aware), strict=True):
        assert a < 0.3 * p  # measured: about 0.05
    # The same bits and margins in the plain filter mean (one shared shift) cost more.
    unsigned = [dataclasses.replace(c, signed=False) for c in carriers]
    shared = {k: v.clone() for k, v in state.items()}
    embed.place(shared, unsigned, [c.secret(key) for c in unsigned], margins, bits, metrics)
    for a, s in zip(output_change(aware), output_change(shared), strict=True):
        assert a < s

    # All put every bit exactly at its margin.
    for placed in (plain, aware):
        marked = example.build()
        marked.load_state_dict(placed)
        assert embed.min_margin(marked, model, carriers, xs, margins, bits) == pytest.approx(1.0, abs=1e-4)


def test_placement_metric_is_stored_with_the_master_and_matches_the_data(issued):
    from wmtrace import api
    from wmtrace.schemes.whitebox import Config

    root, _ = issued
    with api.open_registry(root / "registry") as reg:
        m = reg.master("small")
        stored = reg.stored(m)
        assert reg.moments_path(m.weights).exists()
        carriers = list(Config.of(m).carriers)
        train = modelio.tensors(modelio.dataset(m.data, "train"), embed.EmbedConfig.moment_samples)[0]
        again = embed.input_moments(modelio.build_model(m), carriers, train, embed.EmbedConfig.ridge)
    assert {k for k in stored if not k.startswith("blackbox.")} == {c.name for c in carriers}
    for c, mt in zip(carriers, again, strict=True):
        assert stored[c.name].shape == (c.dim, c.dim)
        assert np.allclose(stored[c.name], mt, rtol=1e-6, atol=1e-9)
