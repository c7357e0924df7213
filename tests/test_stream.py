"""Lazy reading: a leaked file is read tensor by tensor, and trace reads only what could be a carrier."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wmtrace import api, attacks, formats
from wmtrace.errors import BadInput
from wmtrace.registry import Master
from wmtrace.schemes.whitebox import Config, align
from wmtrace.schemes.whitebox.carriers import Carrier
from wmtrace.schemes.whitebox.extract import master_arrays


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 4, 3, 3, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.weight": torch.randn(6, 8, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(5, 6, generator=g).to(torch.float16),
        "steps": torch.arange(3),
    }


def _shard(state: dict[str, torch.Tensor], folder: Path, parts: int) -> None:
    """Write `state` as `parts` shards and an index, as Hugging Face checkpoints ship."""
    names = list(state)
    weight_map = {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        keys = names[i::parts]
        save_file({k: state[k].contiguous() for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _expected(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.to(torch.float32).numpy() for k, v in state.items() if v.is_floating_point()}


def _assert_same(got, expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of tensors read from safetensors files, in order."""
    from wmtrace.formats import safetensors as reader

    seen: list[str] = []
    real = reader._read

    def counting(e, f):
        seen.append(e.key)
        return real(e, f)

    monkeypatch.setattr(reader, "_read", counting)
    return seen


def test_single_file_shapes_come_from_the_header(tmp_path, reads):
    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    source = formats.open_tensors(tmp_path / "m.safetensors")
    assert source.shapes == {k: tuple(v.shape) for k, v in _expected(state).items()}
    assert "a.weight" in source and "steps" not in source and len(source) == 4
    assert reads == []  # nothing read yet
    np.testing.assert_array_equal(source.get("b.weight"), state["b.weight"].float().numpy())
    assert reads == ["b.weight"]
    _assert_same(formats.load_tensors(tmp_path / "m.safetensors"), _expected(state))


@pytest.mark.parametrize("via", ["folder", "index"])
def test_sharded_source_matches_every_tensor(tmp_path, via, reads):
    state = _state()
    _shard(state, tmp_path, 3)
    source = formats.open_tensors(tmp_path if via == "folder" else tmp_path / "model.safetensors.index.json")
    assert reads == []
    _assert_same({k: source[k] for k in source}, _expected(state))
    _assert_same(formats.load_tensors(tmp_path), _expected(state))


@pytest.mark.parametrize("mode", ["int8", "int8-channel"])
def test_int8_with_scale_is_dequantized_lazily(tmp_path, mode, reads):
    state = _state()
    quantized = attacks.quantize({"a.weight": state["a.weight"], "b.weight": state["b.weight"].float()}, mode)
    save_file(quantized, tmp_path / "q.safetensors")
    source = formats.open_tensors(tmp_path / "q.safetensors")
    assert source.shapes == {"a.weight": (8, 4, 3, 3), "b.weight": (6, 8)}  # scales are not weights
    assert reads == []
    want = {k: v.numpy() for k, v in attacks.dequantize(quantized).items()}
    _assert_same(source, want)


def test_int8_zero_point_and_a_scale_that_does_not_fit(tmp_path):
    q = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    scale, zero = torch.tensor([0.5, 0.25]), torch.tensor([1, -1], dtype=torch.int8)
    save_file({"w": q, "w_scale": scale, "w_zero_point": zero}, tmp_path / "z.safetensors")
    got = formats.open_tensors(tmp_path / "z.safetensors")
    assert set(got) == {"w"}
    np.testing.assert_array_equal(got["w"], (q.float() - zero.float()[:, None]).numpy() * scale.numpy()[:, None])
    save_file({"w": q, "w_scale": torch.ones(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(BadInput, match="does not fit its scale"):
        formats.open_tensors(tmp_path / "bad.safetensors")  # caught from the header, before any read


def test_lazy_sharded_source_keeps_the_security_rules(tmp_path):
    state = _state()
    _shard(state, tmp_path, 2)
    data = (tmp_path / "model-00002-of-00002.safetensors").read_bytes()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="model-00002-of-00002.safetensors") as err:
        formats.open_tensors(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "../model-00001-of-00002.safetensors"}}))
    with pytest.raises(BadInput, match="outside"):
        formats.open_tensors(tmp_path / "inner")


def test_locate_reads_only_tensors_shaped_like_a_carrier(tmp_path, reads):
    master = {k: v.float() for k, v in _state().items() if v.is_floating_point()}
    leaked = {k: v + 0.01 * torch.randn_like(v) for k, v in master.items()}
    leaked["huge"] = torch.randn(512, 300)  # 2-D, but too many rows and columns for carrier b
    leaked["conv.like"] = torch.randn(16, 4, 3, 3)  # could hold carrier a: twice its filters
    save_file(leaked, tmp_path / "leak.safetensors")
    carriers = [Carrier("a.weight", (8, 4, 3, 3), 0, 8), Carrier("b.weight", (6, 8), 8, 8)]
    arrays = {k: v.numpy() for k, v in master.items()}
    source = formats.open_tensors(tmp_path / "leak.safetensors")
    found = align.locate(source, arrays, carriers)
    assert [f.source for f in found] == ["a.weight", "b.weight"]
    assert sorted(set(reads)) == ["a.weight", "b.weight"]  # still named as the master: nothing else read
    # Renamed, every tensor whose shape could hold a carrier is read, and only those.
    renamed = {{"a.weight": "x", "b.weight": "y"}.get(k, k): v for k, v in leaked.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    reads.clear()
    moved = align.locate(formats.open_tensors(tmp_path / "renamed.safetensors"), arrays, carriers)
    assert [f.source for f in moved] == ["x", "y"]
    assert "huge" not in reads and "a.bias" not in reads
    assert sorted(set(reads)) == ["c.weight", "conv.like", "x", "y"]  # c (5 x 6) could hold b
    # The same answer from arrays in memory (issue's self-check passes a dict).
    again = align.locate({k: v.float().numpy() for k, v in leaked.items()}, arrays, carriers)
    for f, g in zip(found, again, strict=True):
        assert (f.source, f.similarity) == (g.source, g.similarity)
        np.testing.assert_array_equal(f.weight, g.weight)


def test_trace_of_a_sharded_folder_reads_only_candidates(issued, tmp_path, reads):
    root, buyers = issued
    b = buyers[2]
    state = load_file(b.file)
    state["unrelated.table"] = torch.randn(4000, 3)  # a large tensor no carrier could be
    folder = tmp_path / "hf"
    folder.mkdir()
    _shard(state, folder, 3)
    with api.open_registry(root / "registry") as reg:
        r = api.trace(folder, reg)
        m = reg.master("small")
    assert r.verdict == "identified" and r.buyer == {"id": b.id, "name": b.name}
    assert "unrelated.table" not in reads
    carriers = list(Config.of(m).carriers)
    candidates = {k for k, v in state.items() if any(align._orientations(tuple(v.shape), c) for c in carriers)}
    assert reads and set(reads) <= candidates
    assert len(set(reads)) < len([k for k, v in state.items() if v.is_floating_point()])


def test_master_arrays_reads_only_the_names_asked_for(issued):
    root, _ = issued
    with api.open_registry(root / "registry") as reg:
        m = reg.master("small")
    names = [c.name for c in Config.of(m).carriers]
    whole = master_arrays(m)
    some = master_arrays(m, names)
    assert list(some) == names
    for n in names:
        assert some[n].dtype == whole[n].dtype
        np.testing.assert_array_equal(some[n], whole[n])


def test_master_stored_in_bfloat16_is_read_as_float32(tmp_path):
    state = _state()
    save_file(state, tmp_path / "master.safetensors")
    m = Master("bf", tmp_path / "master.safetensors", "", "none:none", None, {}, "", None)
    got = master_arrays(m, ["b.weight", "c.weight"])
    assert got["b.weight"].dtype == np.float32 and got["c.weight"].dtype == np.float16  # numpy has no bfloat16
    np.testing.assert_array_equal(got["b.weight"], state["b.weight"].float().numpy())
    assert master_arrays(m)["steps"].dtype == np.int64
