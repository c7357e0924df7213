"""The screen before the full match (`screen.rank`): a renamed copy among decoys is found with one full
match per carrier, a carrier that pruning, quantization or permutation changed still passes, and a
copy the screen cannot see is still found by the full match."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wmtrace import api, attacks, formats
from wmtrace.attacks.quantize import SCALE_SUFFIX, dequantize, quantize
from wmtrace.schemes.whitebox import Config, align, screen
from wmtrace.schemes.whitebox.carriers import Carrier

DECOYS = 30  # random tensors of each carrier's shape; before the screen, 8 of them got the full match


def _carriers(root) -> tuple[list[Carrier], dict[str, np.ndarray]]:
    with api.open_registry(root / "registry") as reg:
        m = reg.master("small")
        carriers = list(Config.of(m).carriers)
        state = load_file(m.weights)
    return carriers, {c.name: state[c.name].numpy() for c in carriers}


def _renamed(state: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor under a new name, in a shuffled order (int8 weights keep their scale beside them)."""
    names = [k for k in state if not (k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in state)]
    order = np.random.default_rng(seed).permutation(len(names))
    new = {names[j]: f"blob{i}.w" for i, j in enumerate(order)}
    out = {}
    for k in (names[j] for j in order):
        out[new[k]] = state[k]
        if k + SCALE_SUFFIX in state:
            out[new[k] + SCALE_SUFFIX] = state[k + SCALE_SUFFIX]
    return out, new


def _decoys(carriers: list[Carrier], master: dict[str, np.ndarray], count: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {f"decoy.{c.name}.{i}": torch.from_numpy((rng.standard_normal(c.shape) * master[c.name].std())
                                                    .astype(np.float32))
            for c in carriers for i in range(count)}


@pytest.fixture
def full_matches(monkeypatch) -> list[tuple]:
    """Shape and sum of |weight| of every tensor given the full match (`align._match`)."""
    seen: list[tuple] = []
    real = align._match
    monkeypatch.setattr(align, "_match", lambda t, ref, *a, **k: seen.append(_key(t)) or real(t, ref, *a, **k))
    return seen


def _key(t: np.ndarray) -> tuple:
    return tuple(t.shape), round(float(np.abs(t).sum()), 4)


def _keys(tensors: dict[str, torch.Tensor], c: Carrier) -> set[tuple]:
    return {_key(v) for t in tensors.values() for v in align._views(align._finite(t.float().numpy()), c)}


def test_renamed_permuted_int8_copy_among_decoys_names_the_buyer_with_one_full_match_per_carrier(
        workdir, issued, tmp_path, full_matches):
    _, buyers = issued
    carriers, master = _carriers(workdir)
    state = quantize(attacks.permute(load_file(buyers[1].file), 1.0, seed=5), "int8-channel")
    leaked, new = _renamed(state, seed=1)
    decoys = _decoys(carriers, master, DECOYS, seed=2)
    formats.save_safetensors({**decoys, **leaked}, tmp_path / "leak.safetensors")
    with api.open_registry(workdir / "registry") as reg:
        r = api.trace(tmp_path / "leak.safetensors", reg)
    assert r.buyer and r.buyer["id"] == buyers[1].id
    assert [c["found_as"] for c in r.carriers] == [new[c.name] for c in carriers]
    assert len(full_matches) == len(carriers)  # the true carrier each: no decoy, no other layer
    assert not set(full_matches) & set().union(*(_keys(decoys, c) for c in carriers))


def test_random_decoys_are_rejected_by_the_screen(workdir, issued):
    _, buyers = issued
    carriers, master = _carriers(workdir)
    decoys = _decoys(carriers, master, DECOYS, seed=3)
    for c in carriers:
        sk = screen.sketch(master[c.name].astype(np.float64).reshape(c.shape[0], c.shape[1], -1))
        ranks = [screen.rank(v, sk) for t in decoys.values() for v in align._views(t.double().numpy(), c)]
        assert max(ranks) < screen.MARGIN / 2, c.name


@pytest.mark.parametrize("attack", ["prune 90%", "int8 per tensor", "noise 0.4", "permute, dummies", "prune-filters"])
def test_an_attacked_true_carrier_passes_the_screen(workdir, issued, attack):
    _, buyers = issued
    carriers, master = _carriers(workdir)
    state = load_file(buyers[0].file)
    state = {
        "prune 90%": lambda s: attacks.prune(s, 0.9),
        "int8 per tensor": lambda s: dequantize(quantize(s, "int8")),
        "noise 0.4": lambda s: attacks.noise(s, 0.4),
        "permute, dummies": lambda s: attacks.permute(s, 1.0, seed=2),
        "prune-filters": lambda s: attacks.prune_filters(s, 0.5),
    }[attack](dict(state))
    for c in carriers:
        sk = screen.sketch(master[c.name].astype(np.float64).reshape(c.shape[0], c.shape[1], -1))
        views = align._views(align._finite(state[c.name].float().numpy()), c)
        assert max(screen.rank(v, sk) for v in views) >= screen.MARGIN, c.name


def _linear(rows: int, cols: int, seed: int) -> tuple[Carrier, np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return Carrier("k.weight", (rows, cols), 0, 8), rng.standard_normal((rows, cols)) * 0.02, rng


def test_a_linear_carrier_with_filters_and_inputs_permuted_is_seen_by_the_screen(full_matches):
    """A Linear layer's input channels permuted (a transformer's residual stream reordered): only the
    `channels` view sees it; among random decoys it is matched first, and alone."""
    c, w, rng = _linear(128, 1024, seed=4)
    scale = np.abs(w).max(1, keepdims=True) / 127
    copy = (np.round(w / scale) * scale)[rng.permutation(128)][:, rng.permutation(1024)]  # int8, then permuted
    leaked = {f"d{i}": rng.standard_normal(w.shape) * 0.02 for i in range(10)} | {"renamed": copy}
    sk = screen.sketch(w[:, :, None])
    assert screen._as_stored(copy[:, :, None], sk) < 0.15  # filters against filters: no better than chance
    assert screen.rank(copy[:, :, None], sk) >= 0.9
    (found,) = align.locate(leaked, {c.name: w}, [c])
    assert found.source == "renamed" and found.similarity > 0.99
    assert len(full_matches) == 1


def test_a_copy_the_screen_cannot_see_is_still_found_by_the_full_match(full_matches):
    """Inputs permuted and 70% pruned: the screen ranks the copy with the decoys (rejected), so nothing
    passes and candidates get the full match in the screen's order up to MAX_CANDIDATES, as before the
    screen (each tensor twice: 512 x 128 could hold the carrier transposed)."""
    c, w, rng = _linear(128, 512, seed=5)
    pruned = np.where(np.abs(w) <= np.quantile(np.abs(w), 0.7), 0.0, w)
    copy = pruned[rng.permutation(128)][:, rng.permutation(512)]
    leaked = {f"d{i}": rng.standard_normal(w.shape) * 0.02 for i in range(5)} | {"renamed": copy}
    assert screen.rank(copy[:, :, None], screen.sketch(w[:, :, None])) < screen.MARGIN
    (found,) = align.locate(leaked, {c.name: w}, [c])
    assert found.source == "renamed" and not found.by_name and found.similarity > 0.9
    assert full_matches[0] == _key(copy[:, :, None])  # ranked first all the same
    assert len(full_matches) == align.MAX_CANDIDATES < 2 * len(leaked)


def test_the_search_stops_only_after_a_match_the_screen_agrees_with(monkeypatch, full_matches):
    """With every candidate ranked as clearly unlike the carrier, a perfect match does not end the
    search: the screen and the full match must agree before the other candidates are skipped."""
    c, w, rng = _linear(64, 256, seed=6)
    leaked = {"renamed": w.copy()} | {f"d{i}": rng.standard_normal(w.shape) * 0.02 for i in range(12)}
    (found,) = align.locate(leaked, {c.name: w}, [c])
    assert found.source == "renamed" and len(full_matches) == 1
    full_matches.clear()
    monkeypatch.setattr(screen, "rank", lambda t, sk: 0.0)
    (found,) = align.locate(leaked, {c.name: w}, [c])
    assert found.source == "renamed" and len(full_matches) == align.MAX_CANDIDATES
