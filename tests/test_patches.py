"""Per-buyer patches: `issue --store patch` keeps only what differs from the master, and `materialize`
rebuilds the very bytes a full issue writes (same buyer, same seed), checked against the registered
sha256; broken, foreign or tampered patches and changed masters are refused in one line, leaving
no file."""

import filecmp
import hashlib
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from typer.testing import CliRunner

from wmtrace import api, formats, modelio
from wmtrace.cli import app
from wmtrace.errors import BadArgument, BadInput, CorruptFile
from wmtrace.formats import patch, stream
from wmtrace.pipeline import patches
from wmtrace.registry import Master, MasterConfig

runner = CliRunner()
FACTORY, DATA = "wmtrace.example:build", "tests.smalldata:dataset"


def twins(src: Path, dest: Path) -> tuple[Path, Path]:
    """Two copies of one registry in the same state: the same next buyer ID in each."""
    a, b = dest / "full", dest / "patch"
    shutil.copytree(src, a, symlinks=True)
    shutil.copytree(src, b, symlinks=True)
    return a, b


def issue_both(src: Path, dest: Path, name: str, master: str | None = None):
    """The buyer `name` issued whole in one copy of the registry and as a patch in the other."""
    a, b = twins(src, dest)
    full_reg, patch_reg = api.open_registry(a), api.open_registry(b)
    (full,) = api.issue(full_reg, names=[name], out=dest / "copies", master=master, seed=11, eval_samples=50)
    (patched,) = api.issue(patch_reg, names=[name], out=dest / "patches", master=master, seed=11, eval_samples=50,
                           store="patch")
    return full_reg, patch_reg, full, patched


@pytest.fixture(scope="module")
def single(tmp_path_factory, issued):
    root, _ = issued
    dest = tmp_path_factory.mktemp("patches")
    return dest, issue_both(root / "registry", dest, "eve")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, master_file):
    """A master registered from an fp16 file in three shards: copies are written in three fp16 shards,
    so every unmarked tensor is the master's converted to fp16 when materialized."""
    dest = tmp_path_factory.mktemp("sharded")
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(master_file)).items()}
    formats.save_sharded(state, dest / "half", 3)
    reg = api.open_registry(dest / "registry", create=True)
    api.init(reg, "half", dest / "half", FACTORY, data=DATA, fidelity_target=0, scheme_names=["whitebox"])
    reg.close()
    return dest, issue_both(dest / "registry", dest, "shard-buyer", "half")


def test_writer_gives_the_bytes_of_safetensors():
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(stream.TORCH.values()):
        for shape in ((3, 5), (), (0, 2), (7,)):
            t = torch.randint(0, 100, shape, generator=g) if dtype.is_floating_point is False else \
                torch.randn(shape, generator=g) * 10
            tensors[f"layer.{len(shape)}.{(i * 7) % 5}.{dtype}"] = t.to(dtype)
    ours = b"".join(bytes(p) for p in stream.tensors_chunks(tensors, {"note": "é"}))
    assert ours == save(tensors, metadata={"note": "é"})
    assert stream.file_size([stream.Entry.of(k, v) for k, v in tensors.items()], {"note": "é"}) == len(ours)


def test_full_and_materialized_copies_are_the_same_bytes(single, tmp_path):
    dest, (full_reg, patch_reg, full, patched) = single
    assert patched.file.endswith(".wmpatch") and patched.store == "patch" and full.store == "full"
    assert patched.id == full.id and patched.sha256 == full.sha256  # issue is deterministic given the seed
    assert patched.sha256 == modelio.sha256_file(full.file)
    result = api.materialize(patch_reg, "eve", tmp_path / "eve.safetensors")
    assert filecmp.cmp(tmp_path / "eve.safetensors", full.file, shallow=False)
    assert result["sha256"] == modelio.sha256_file(tmp_path / "eve.safetensors") == patched.sha256
    assert result["bytes"] == Path(full.file).stat().st_size
    traced = api.trace(tmp_path / "eve.safetensors", patch_reg)
    assert traced.verdict == "identified" and traced.buyer["id"] == patched.id
    assert [b.public()["store"] for b in api.list_buyers(patch_reg) if b.name == "eve"] == ["patch"]


def test_patch_holds_only_what_differs(single):
    """The patch's tensors are exactly those whose bytes differ from the master's, and nothing else
    of the copy (on this small CNN the marked layers are most of its bytes; MiniLM's figure is in
    benchmarks/bench_patches.py)."""
    _, (full_reg, _, full, patched) = single
    master = load_file(str(full_reg.master("small").weights))
    copy = load_file(full.file)
    changed = {k for k in copy if not torch.equal(copy[k], master[k])}
    manifest, tensors = patch.read(patched.file)
    assert set(manifest.patched) == changed and changed
    assert 0 < len(changed) < len(copy)
    kept = sum(copy[k].numel() * copy[k].element_size() for k in changed)
    assert Path(patched.file).stat().st_size < kept + 4096 < Path(full.file).stat().st_size


def test_rows_that_differ_are_stored_as_rows(tmp_path):
    """A tensor with a few changed rows costs those rows, not the tensor: 3 of 512 rows give a patch
    under 2% of the tensor, and master + patch gives back the copy."""
    g = torch.Generator().manual_seed(1)
    master = {"w": torch.randn(512, 64, generator=g), "b": torch.randn(64, generator=g).bfloat16()}
    formats.save_safetensors(master, tmp_path / "m.safetensors")
    copy = {"w": master["w"].clone(), "b": master["b"].clone()}
    copy["w"][[3, 100, 511]] += 0.5
    with stream.FileTensors(tmp_path / "m.safetensors") as f:
        tensors = patch.diff(copy, f)
    assert set(tensors) == {"r/w", "v/w"} and tensors["r/w"].tolist() == [3, 100, 511]
    assert sum(t.numel() * t.element_size() for t in tensors.values()) < 0.02 * copy["w"].numel() * 4


def test_sharded_master_materializes_shard_by_shard(sharded, tmp_path):
    dest, (full_reg, patch_reg, full, patched) = sharded
    assert full_reg.master("half").config.shards == 3
    assert Path(full.file).is_dir() and patched.sha256 == full.sha256
    out = tmp_path / "copy"
    api.materialize(patch_reg, "shard-buyer", out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in Path(full.file).iterdir()) and len(names) == 4
    for n in names:
        assert filecmp.cmp(out / n, Path(full.file) / n, shallow=False)
    assert modelio.sha256_file(out) == patched.sha256
    assert {v.dtype for k, v in load_file(str(out / names[0])).items() if v.is_floating_point()} == {torch.float16}
    traced = api.trace(out, patch_reg)
    assert traced.verdict == "identified" and traced.buyer["id"] == patched.id
    with pytest.raises(BadInput, match="sharded folder"):
        api.materialize_stream(patch_reg, "shard-buyer")


def test_stream_checks_the_sha256_as_it_goes(single, tmp_path):
    dest, (_, patch_reg, full, patched) = single
    size, chunks = api.materialize_stream(patch_reg, "eve")
    data = b"".join(chunks)
    assert size == len(data) and data == Path(full.file).read_bytes()
    work = tmp_path / "reg"
    shutil.copytree(patch_reg.root, work)
    reg = api.open_registry(work)
    _tamper(Path(patched.file), tmp_path / "eve.wmpatch")
    _point(reg, "eve", tmp_path / "eve.wmpatch")
    size, chunks = api.materialize_stream(reg, "eve")
    got = []
    with pytest.raises(CorruptFile, match="altered"):
        for c in chunks:
            got.append(c)
    assert sum(map(len, got)) == size  # every byte went out; only the end says it is not the copy


def _tamper(src: Path, dst: Path) -> None:
    """A well-formed copy of the patch whose first stored tensor has one byte changed: only the
    sha256 of the rebuilt copy can tell."""
    manifest, tensors = patch.read(src)
    key = next(k for k in tensors if k[:2] in ("t/", "v/", "x/"))
    if key.startswith("x/"):
        raw = bytearray(zlib.decompress(tensors[key].numpy().tobytes()))
        raw[len(raw) // 2] ^= 0x01
        tensors[key] = torch.frombuffer(bytearray(zlib.compress(bytes(raw))), dtype=torch.uint8)
    else:
        flat = tensors[key].contiguous().reshape(-1).view(torch.uint8)
        flat[0] ^= 0x01
    patch.write(dst, manifest, tensors)


def _flip(path: Path) -> None:
    """One byte near the end of the file flipped, header intact."""
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _point(reg, name: str, path: Path) -> None:
    """Make the registry's row of buyer `name` name another patch file."""
    import sqlite3

    conn = sqlite3.connect(reg.root / "wmtrace.db")
    conn.execute("UPDATE buyers SET file = ? WHERE name = ?", (str(path), name))
    conn.commit()
    conn.close()


@pytest.fixture
def private(single, tmp_path):
    """A private copy of the patch registry (with its patch files), to break."""
    dest, (_, patch_reg, _, patched) = single
    work = tmp_path / "reg"
    shutil.copytree(patch_reg.root, work)
    shutil.copy(patched.file, tmp_path / "eve.wmpatch")
    reg = api.open_registry(work)
    _point(reg, "eve", tmp_path / "eve.wmpatch")
    return reg, tmp_path / "eve.wmpatch", tmp_path


def _refused(reg, out: Path, error, match: str) -> None:
    with pytest.raises(error, match=match) as e:
        api.materialize(reg, "eve", out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_corrupt_and_tampered_patches_are_refused(private):
    reg, path, tmp = private
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    _refused(reg, tmp / "a.safetensors", CorruptFile, "not a readable safetensors|does not match")
    path.write_bytes(good)
    _tamper(path, path)
    _refused(reg, tmp / "a.safetensors", CorruptFile, "altered")
    path.write_bytes(good)
    _flip(path)
    _refused(reg, tmp / "a.safetensors", CorruptFile, "altered|XOR delta")
    path.unlink()
    _refused(reg, tmp / "a.safetensors", BadInput, "patch file missing")


def test_a_patch_of_another_buyer_is_refused(private, single):
    reg, path, tmp = private
    _, (_, patch_reg, _, _) = single
    (other,) = api.issue(reg, names=["mallory"], out=tmp / "other", eval_samples=50, store="patch")
    shutil.copy(other.file, path)
    _refused(reg, tmp / "a.safetensors", CorruptFile, "does not belong to buyer 'eve'")


def test_a_changed_master_is_refused(private):
    reg, _, tmp = private
    weights = reg.master("small").weights
    data = bytearray(weights.read_bytes())
    with stream.FileTensors(weights) as f:
        manifest, _ = patch.read(tmp / "eve.wmpatch")
        untouched = next(e.name for e in manifest.entries if e.name not in manifest.patched and e.nbytes)
        offset = f.offsets[untouched][0]
    data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    _refused(reg, tmp / "a.safetensors", BadInput, "master's weights changed")


def test_xor_deltas_round_trip_and_refuse_bombs(tmp_path):
    """Every element moved by about 2% (as a mark moves a carrier): stored as XOR planes, smaller
    than the tensor, exact; a delta that inflates beyond the tensor is refused."""
    g = torch.Generator().manual_seed(2)
    master = {"w": torch.randn(256, 128, generator=g)}
    formats.save_safetensors(master, tmp_path / "m.safetensors")
    copy = {"w": master["w"] * (1 + 0.02 * torch.randn(256, 128, generator=g))}
    with stream.FileTensors(tmp_path / "m.safetensors") as f:
        tensors = patch.diff(copy, f)
    assert set(tensors) == {"x/w"} and tensors["x/w"].numel() < 0.8 * copy["w"].numel() * 4
    base = master["w"].reshape(-1).view(torch.uint8).numpy()
    back = patch.unxor_planes(base, tensors["x/w"].numpy().tobytes(), 4)
    assert back.tobytes() == copy["w"].numpy().tobytes()
    with pytest.raises(CorruptFile, match="inflates"):
        patch.unxor_planes(base, zlib.compress(bytes(10 * len(base))), 4)


@pytest.mark.parametrize("shard", ["../evil.safetensors", "sub/evil.safetensors", ".hidden.safetensors",
                                   "model.safetensors.index.json", "a/../../b.safetensors"])
def test_path_tricks_in_a_manifest_are_refused(private, shard):
    reg, path, tmp = private
    manifest, tensors = patch.read(path)
    manifest.files = [(shard, len(manifest.entries))]
    patch.write(path, manifest, tensors)
    _refused(reg, tmp / "a", CorruptFile, "not a plain file name")
    assert not (tmp / "evil.safetensors").exists()


def test_manifest_lies_are_refused(private):
    reg, path, tmp = private
    manifest, tensors = patch.read(path)
    name = next(iter(manifest.patched))
    lies = [
        lambda m, t: t.pop(next(k for k in t if k[2:] == name)),
        lambda m, t: t.update({"t/extra": torch.zeros(1)}),
        lambda m, t: m.patched.update({"nowhere": "whole"}),
        lambda m, t: m.entries.append(m.entries[0]),
        lambda m, t: setattr(m, "version", patch.VERSION + 1),
    ]
    for lie in lies:
        m = patch.Manifest(**{**manifest.__dict__, "entries": list(manifest.entries),
                              "patched": dict(manifest.patched)})
        t = dict(tensors)
        lie(m, t)
        patch.write(path, m, t)
        _refused(reg, tmp / "a.safetensors", CorruptFile, "patch")


def test_store_arguments(single, tmp_path):
    _, (full_reg, _, full, _) = single
    with pytest.raises(BadArgument, match="store must be one of full, patch"):
        api.issue(full_reg, names=["x"], store="delta")
    gguf = Master("g", Path("g.safetensors"), "0" * 64, "f:f", None,
                  MasterConfig.from_json({**full_reg.master("small").config.to_json(), "format": "gguf"}), "", None)
    with pytest.raises(BadInput, match="GGUF master: its copies are written whole"):
        patches.check_store("patch", gguf)
    with pytest.raises(BadInput, match="issued whole"):
        api.materialize(full_reg, "eve", tmp_path / "x.safetensors")
    with pytest.raises(BadInput, match="no issued buyer 'nobody'"):
        api.materialize(full_reg, "nobody", tmp_path / "x.safetensors")


def test_cli_issue_patch_then_materialize(workdir, tmp_path):
    reg = workdir / "registry"
    names = tmp_path / "names.txt"
    names.write_text("carol\n")
    r = runner.invoke(app, ["issue", "--names", str(names), "--store", "patch", "--eval-samples", "50",
                            "--out", str(tmp_path / "out"), "--registry", str(reg), "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["buyers"][0]
    assert row["file"].endswith("carol.wmpatch")
    r = runner.invoke(app, ["buyers", "--registry", str(reg), "--json"])
    listed = {b["name"]: b for b in json.loads(r.stdout)["buyers"]}
    assert listed["carol"]["store"] == "patch"
    assert {b["store"] for n, b in listed.items() if n != "carol"} == {"full"}
    r = runner.invoke(app, ["materialize", "carol", "-o", str(tmp_path / "carol.safetensors"), "--registry", str(reg),
                            "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["sha256"] == listed["carol"]["sha256"] == hashlib.sha256(
        (tmp_path / "carol.safetensors").read_bytes()).hexdigest()
    r = runner.invoke(app, ["materialize", "carol", "-o", str(tmp_path / "carol.safetensors"), "--registry", str(reg)])
    assert r.exit_code == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["issue", "--buyers", "1", "--store", "zip", "--registry", str(reg)])
    assert r.exit_code == 2 and "--store must be one of full, patch" in r.stderr
    assert got["bytes"] == (tmp_path / "carol.safetensors").stat().st_size
