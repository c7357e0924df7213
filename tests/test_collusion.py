"""Several buyers merge their copies: score accusation names a colluder and never an innocent."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wmtrace import api, attacks, example, formats
from wmtrace.cli import app
from wmtrace.coding import accuse, codes

SPEC = codes.CodeSpec()
KEY = bytes(range(32))


def _pm(words: np.ndarray) -> np.ndarray:
    return np.unpackbits(words, axis=1).astype(np.float64) * 2 - 1


def test_vectorised_codewords_equal_single_encodings():
    ids = [0, 1, 2, 255, 256, 65537, 2**32 - 1]
    words = codes.codewords(KEY, "m", ids, SPEC)
    for i, row in zip(ids, words, strict=True):
        assert np.array_equal(np.unpackbits(row), codes.codeword(KEY, "m", i, SPEC))
    with pytest.raises(ValueError):
        codes.codewords(KEY, "m", [2**32], SPEC)


def test_codewords_of_consecutive_ids_are_uncorrelated_on_scored_bits():
    bits = _pm(codes.codewords(KEY, "m", np.arange(1, 2001), SPEC))
    mask = accuse.scored_bits(SPEC)
    off = ~np.eye(len(bits), dtype=bool)
    scored = (bits[:, mask] @ bits[:, mask].T / mask.sum())[off]
    everything = (bits @ bits.T / SPEC.bits)[off]
    # The ID symbols of consecutive IDs share their leading bytes: over all bits codewords correlate...
    assert everything.mean() > 0.05
    # ...while tag and parity bits behave as fair coins: mean 0, spread 1/sqrt(bits).
    assert abs(scored.mean()) < 0.003
    assert scored.std() == pytest.approx(1 / np.sqrt(mask.sum()), rel=0.05)


@pytest.mark.parametrize("kind", ["unmarked", "average of 3"])
def test_innocent_scores_follow_the_null_and_stay_below_threshold(kind):
    rng = np.random.default_rng(1)
    words = codes.codewords(KEY, "m", np.arange(1, 5001), SPEC)
    if kind == "unmarked":
        soft, guilty = rng.normal(size=SPEC.bits), []
    else:
        guilty = [10, 500, 4000]
        soft = _pm(words[guilty]).mean(0) * rng.uniform(1, 3, SPEC.bits)
    z = accuse.scores(soft, words, SPEC)
    innocent = np.delete(z, guilty)
    assert abs(innocent.mean()) < 0.05 and innocent.std() == pytest.approx(1, abs=0.05)
    assert (innocent >= 3).mean() <= 2 * np.exp(-4.5)  # Hoeffding's tail, with room for sampling
    accused = accuse.accuse(soft, words, SPEC)
    assert {a.index for a in accused} <= set(guilty)
    assert (len(accused) >= 1) == bool(guilty)
    for a in accused:
        assert a.score >= accuse.threshold(len(words), 1e-6) and a.false_accusation_bound <= 1e-6


def test_scores_ignore_scale_and_missing_bits():
    words = codes.codewords(KEY, "m", np.arange(1, 50), SPEC)
    soft = _pm(words[[3, 7]]).mean(0)
    z = accuse.scores(soft, words, SPEC)
    assert np.allclose(accuse.scores(7.5 * soft, words, SPEC), z)
    half = soft.copy()
    half[128:] = np.nan  # one carrier lost
    zh = accuse.scores(half, words, SPEC)
    assert set(np.argsort(-zh)[:2]) == {3, 7}
    assert not accuse.scores(np.full(SPEC.bits, np.nan), words, SPEC).any()
    assert accuse.bound(0.0, 50) == 1.0 and accuse.bound(accuse.threshold(50, 1e-6), 50) == pytest.approx(1e-6)


def _merge(files, how, path):
    merged = attacks.collude([load_file(str(f)) for f in files], how)
    formats.save_safetensors(merged, path)
    return path


def _trace(root, path):
    with api.open_registry(root / "registry") as reg:
        return api.trace(path, reg)


def _named(r) -> set[int]:
    if r.verdict == "identified":
        return {r.buyer["id"]}
    return {c["id"] for c in r.colluders}


@pytest.mark.parametrize(
    "how,picks", [("average", [0, 5]), ("average", [2, 6]), ("average", [1, 3, 7]), ("majority", [0, 4, 6]),
                  ("layers", [2, 5, 7])]
)
def test_merged_copies_name_a_colluder_and_no_innocent(crowd, tmp_path, how, picks):
    root, buyers = crowd
    assert len(buyers) == 8
    guilty = {buyers[i].id for i in picks}
    r = _trace(root, _merge([buyers[i].file for i in picks], how, tmp_path / "merged.safetensors"))
    named = _named(r)
    assert named and named <= guilty, (r.verdict, r.colluders, guilty)
    assert r.exit_code == 0
    if how == "average":  # bits where the codewords differ cancel: decoding alone names nobody right
        assert r.verdict == "colluders"
    for c in r.colluders:  # accused by score, or by decoding when one copy's carrier came through whole
        assert c["false_accusation_bound"] <= 1e-6
    if r.verdict == "colluders":
        assert r.false_positive_probability == max(c["false_accusation_bound"] for c in r.colluders)


def test_merges_without_a_buyer_copy_accuse_nobody_and_a_diluted_copy_only_its_buyer(
    crowd, master_file, other_master_file, tmp_path
):
    root, buyers = crowd
    r = _trace(root, _merge([master_file, other_master_file], "average", tmp_path / "innocent.safetensors"))
    assert r.verdict == "no watermark" and not r.colluders and r.buyer is None
    b = buyers[4]
    r = _trace(root, _merge([master_file, b.file], "average", tmp_path / "diluted.safetensors"))
    assert _named(r) == {b.id}


def test_single_copies_and_unmarked_models_get_no_colluders_verdict(crowd, master_file, other_master_file):
    root, buyers = crowd
    for b in buyers:
        r = _trace(root, b.file)
        assert (r.verdict, r.buyer["id"], r.colluders) == ("identified", b.id, [])
    for f in (master_file, other_master_file):
        r = _trace(root, f)
        assert r.verdict == "no watermark" and not r.colluders


def test_cli_attack_collude_and_trace(crowd, tmp_path):
    root, buyers = crowd
    runner = CliRunner()
    out = tmp_path / "merged.safetensors"
    r = runner.invoke(app, ["attack", "collude", buyers[0].file, buyers[1].file, "--how", "average", "-o", str(out),
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["file"] == str(out)
    state = load_file(str(out))
    model = example.build()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    expected = (load_file(buyers[0].file)["features.0.weight"] + load_file(buyers[1].file)["features.0.weight"]) / 2
    assert torch.allclose(state["features.0.weight"], expected)

    reg = ["--registry", str(root / "registry")]
    r = runner.invoke(app, ["trace", str(out), "--json", *reg])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "colluders" and d["buyer"] is None
    assert d["colluders"] and {c["id"] for c in d["colluders"]} <= {buyers[0].id, buyers[1].id}
    r = runner.invoke(app, ["trace", str(out), *reg])
    assert r.exit_code == 0 and "colluders" in r.stdout and "accused" in r.stdout
    r = runner.invoke(app, ["trace", str(out), "--max-false-positive", "2", *reg])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["one file", "unknown how", "missing file", "no output"])
def test_cli_attack_collude_bad_input_is_one_line_exit_2(crowd, tmp_path, case):
    _, buyers = crowd
    a, b = buyers[0].file, buyers[1].file
    out = ["-o", str(tmp_path / "m.safetensors")]
    args = {
        "one file": [a, *out],
        "unknown how": [a, b, "--how", "blend", *out],
        "missing file": [a, str(tmp_path / "nope.safetensors"), *out],
        "no output": [a, b],
    }[case]
    r = CliRunner().invoke(app, ["attack", "collude", *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (tmp_path / "m.safetensors").exists()
