"""Hostile leaked files: fifos and symlinks, memory bombs in every format, non-finite weights and
decoy tensors. A hostile file gets one `error:` line and exit code 2 and changes nothing; memory
stays within twice what the file holds on disk plus 500 MB; a tampered copy never names another
buyer. Bombs run in a child process so that their peak memory can be measured."""

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from wmtrace import example, formats
from wmtrace.cli import app
from wmtrace.errors import BadInput
from wmtrace.schemes.whitebox import align

from .test_cli import snapshot

runner = CliRunner()
MB = 1 << 20
CARRIERS = ("features.7.weight", "features.11.weight")

# Runs `wmtrace trace` in a child of a fresh helper, so ru_maxrss of RUSAGE_CHILDREN is the trace's own.
MEASURE = """
import json, resource, subprocess, sys
try:
    p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120)
    rc, err = p.returncode, p.stderr
except subprocess.TimeoutExpired:
    rc, err = "timeout", ""
print(json.dumps({"rc": rc, "stderr": err, "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measured_trace(path: Path, registry: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "wmtrace", "trace", str(path), "--registry",
           str(registry)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, check=True)
    return json.loads(out.stdout)


def on_disk(path: Path) -> int:
    """Bytes the file (or every file of its folder) really holds: allocated blocks, so sparse files count 0."""
    files = [path] if path.is_file() else []
    files += [p for p in path.parent.iterdir() if p.is_file() and p != path]
    return sum(p.stat().st_blocks * 512 for p in files)


def assert_refused(r: dict, path: Path, reason: str) -> None:
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error:") and reason in lines[0], r["stderr"]
    assert "Traceback" not in r["stderr"]
    bound = 2 * on_disk(path) / MB + 500
    assert r["maxrss_mb"] <= bound, f"peak memory {r['maxrss_mb']:.0f} MB, bound {bound:.0f} MB"


def run(*args, registry: Path):
    return runner.invoke(app, [*map(str, args), "--registry", str(registry)], catch_exceptions=False)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (opening a fifo blocks until a writer comes)."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(r, reason: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:") and reason in lines[0], r.stderr


def buyer_file(issued, i: int = 0) -> Path:
    return Path(issued[1][i].file)


# --- 1, 2: fifos, devices and symlinks ----------------------------------------------------------


def test_fifo_and_device_are_not_regular_files(workdir, tmp_path):
    reg = workdir / "registry"
    before = snapshot(reg)
    os.mkfifo(tmp_path / "leak.safetensors")
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    with deadline(60):
        for name in ("leak.safetensors", "zero.safetensors"):
            refused(run("trace", tmp_path / name, registry=reg), f"{name}: not a regular file")
            with pytest.raises(BadInput, match="not a regular file"):
                formats.open_tensors(tmp_path / name)
    refused(run("trace", tmp_path / "missing.safetensors", registry=reg), "no such file")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.safetensors")
    refused(run("trace", tmp_path / "dangling.safetensors", registry=reg), "no such file")
    assert snapshot(reg) == before


def test_folder_reads_only_regular_files_inside_it(workdir, issued, tmp_path):
    reg = workdir / "registry"
    state = load_file(buyer_file(issued, 1))
    names = sorted(state)
    leak = tmp_path / "leak"
    leak.mkdir()
    save_file({k: state[k] for k in names[::2]}, leak / "a.safetensors")
    (tmp_path / "elsewhere").mkdir()
    save_file({k: state[k] for k in names[1::2]}, tmp_path / "elsewhere" / "b.safetensors")
    before = snapshot(reg)

    os.symlink(tmp_path / "elsewhere" / "b.safetensors", leak / "b.safetensors")  # leads outside: refused
    refused(run("trace", leak, registry=reg), "links outside the folder")
    with pytest.raises(BadInput, match="links outside"):
        formats.open_tensors(leak)
    (leak / "b.safetensors").unlink()

    os.mkfifo(leak / "c.safetensors")  # a fifo named like a shard: refused, never opened
    with deadline(60):
        refused(run("trace", leak, registry=reg), "c.safetensors: not a regular file")
    (leak / "c.safetensors").unlink()
    assert snapshot(reg) == before

    # A symlink that stays inside is followed; a fifo not named like a model file is ignored.
    (leak / "sub").mkdir()
    save_file({k: state[k] for k in names[1::2]}, leak / "sub" / "real.safetensors")
    os.symlink(leak / "sub" / "real.safetensors", leak / "b.safetensors")
    os.mkfifo(leak / "notes")
    with deadline(120):
        r = run("trace", leak, "--json", registry=reg)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["buyer"]["id"] == issued[1][1].id


def test_index_and_its_shards_must_be_regular_files(tmp_path, issued):
    state = load_file(buyer_file(issued))
    formats.save_sharded(state, tmp_path / "m", shards=2)
    index = tmp_path / "m" / "model.safetensors.index.json"
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    with deadline(60), pytest.raises(BadInput, match="not a regular file"):
        formats.open_tensors(index)


# --- 3: memory bombs ------------------------------------------------------------------------------


def _linear_onnx(folder: Path, dims: list[int], tensor) -> Path:
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dims[1]])], [tensor])
    onnx.save(helper.make_model(graph), folder / "m.onnx")
    return folder / "m.onnx"


def _external(dims: list[int], length: int | None) -> onnx.TensorProto:
    t = numpy_helper.from_array(np.zeros(1, np.float32), "w")
    t.dims[:] = dims
    external_data_helper.set_external_data(t, location="w.bin", offset=0, **({} if length is None else
                                                                               {"length": length}))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    return t


def onnx_sparse_external(tmp: Path) -> Path:
    """Dims and length agree with a 3 GiB external file that holds nothing on disk (sparse)."""
    dims = [1 << 14, 3 << 14]
    path = _linear_onnx(tmp / "sparse", dims, _external(dims, dims[0] * dims[1] * 4))
    with open(tmp / "sparse" / "w.bin", "wb") as f:
        f.truncate(3 << 30)
    return path


def onnx_external_larger_than_dims(tmp: Path) -> Path:
    """A 4x4 tensor whose external data, read to the end, is a 3 GiB sparse file (6.4 GB before)."""
    path = _linear_onnx(tmp / "long", [4, 4], _external([4, 4], None))
    with open(tmp / "long" / "w.bin", "wb") as f:
        f.truncate(3 << 30)
    return path


def onnx_external_past_end(tmp: Path) -> Path:
    path = _linear_onnx(tmp / "short", [64, 64], _external([64, 64], 64 * 64 * 4))
    (tmp / "short" / "w.bin").write_bytes(bytes(100))
    return path


def onnx_raw_dims_lie(tmp: Path) -> Path:
    """64 bytes of raw data under dims that call for 4 GiB."""
    t = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    t.dims[:] = [1 << 15, 1 << 15]
    return _linear_onnx(tmp / "raw", [1 << 15, 1 << 15], t)


def _small_zip(state: dict[str, torch.Tensor]) -> zipfile.ZipFile:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return zipfile.ZipFile(buf)


def checkpoint_stride_zero(tmp: Path) -> Path:
    """2^29 float16 elements over a 2-byte storage: 1.6 KB on disk (2.4 GB of memory before)."""
    t = torch.as_strided(torch.zeros(1, dtype=torch.float16), (1 << 29,), (0,))
    torch.save({"w": t}, tmp / "stride.pt")
    assert (tmp / "stride.pt").stat().st_size < 4096  # torch.save kept the stride
    return tmp / "stride.pt"


def checkpoint_deflate_bomb(tmp: Path) -> Path:
    """A 1 GiB float32 storage of zeros, deflated to about 1 MB (1.3 GB of memory before)."""
    n = 1 << 28
    src = _small_zip({"w": torch.zeros(3)})
    with zipfile.ZipFile(tmp / "bomb.pt", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # storage numel and tensor size 3 -> n
                data = data.replace(b"K\x03t", b"J" + struct.pack("<i", n) + b"t", 1)
                data = data.replace(b"K\x00K\x03\x85", b"K\x00J" + struct.pack("<i", n) + b"\x85", 1)
            if info.filename.endswith("data/0"):  # by name: the archive's deflate, not the source's stored
                with z.open(info.filename, "w", force_zip64=True) as w:
                    for _ in range(n * 4 // (16 * MB)):
                        w.write(bytes(16 * MB))
            else:
                z.writestr(info, data)
    assert (tmp / "bomb.pt").stat().st_size < 8 * MB
    return tmp / "bomb.pt"


def checkpoint_legacy_oversized(tmp: Path) -> Path:
    """Legacy (non-zip) checkpoint declaring a 4 GiB storage, with 4 MB of it in the file."""
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    n = (1 << 30) - 1
    data = data.replace(b"K\x03Nt", b"J" + struct.pack("<i", n) + b"Nt", 1)
    data = data.replace(b"K\x00K\x03\x85", b"K\x00J" + struct.pack("<i", n) + b"\x85", 1)
    data = data[: data.rindex(b"a.") + 2] + struct.pack("<q", n) + bytes(4 * MB)
    (tmp / "legacy.pt").write_bytes(data)
    return tmp / "legacy.pt"


BOMBS = {
    "onnx-sparse-external": (onnx_sparse_external, "is sparse"),
    "onnx-external-longer-than-dims": (onnx_external_larger_than_dims, "dims call for 64"),
    "onnx-external-past-end": (onnx_external_past_end, "past the end"),
    "onnx-raw-data-dims-lie": (onnx_raw_dims_lie, "do not fit its 64 bytes"),
    "checkpoint-stride-zero": (checkpoint_stride_zero, "strides that repeat data"),
    "checkpoint-deflate-bomb": (checkpoint_deflate_bomb, "is compressed"),
    "checkpoint-legacy-oversized": (checkpoint_legacy_oversized, "corrupt or truncated checkpoint"),
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_memory_bombs_are_refused_within_bounded_memory(kind, workdir, tmp_path):
    reg = workdir / "registry"
    make, reason = BOMBS[kind]
    path = make(tmp_path)
    before = snapshot(reg)
    assert_refused(measured_trace(path, reg), path, reason)
    assert snapshot(reg) == before
    with pytest.raises(BadInput, match=reason):
        formats.open_tensors(path)


def test_genuine_copy_stays_within_the_memory_bound(workdir, issued):
    path = buyer_file(issued)
    r = measured_trace(path, workdir / "registry")
    assert r["rc"] == 0, r
    assert r["maxrss_mb"] <= 2 * on_disk(path) / MB + 500


def test_zip_member_declaring_more_than_the_file_is_refused(tmp_path):
    src = _small_zip({"w": torch.zeros(3)})
    with zipfile.ZipFile(tmp_path / "c.pt", "w") as z:
        for info in src.infolist():
            z.writestr(info, src.read(info.filename))
    data = bytearray((tmp_path / "c.pt").read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last member's central directory entry: sizes at +20, +24
    data[central + 20 : central + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(BadInput, match="more than the file"):
        formats.open_tensors(tmp_path / "c.pt")


def test_shared_storage_views_are_converted_only_when_read(workdir, tmp_path):
    """500 views of one 4 MB float16 storage: 500 tensors of 8 MB each once float32 (4 GB when the
    reader converted them all up front); only those read take memory."""
    base = torch.randn(1 << 21).to(torch.float16)
    torch.save({f"v{i}": base for i in range(500)}, tmp_path / "views.pt")
    assert (tmp_path / "views.pt").stat().st_size < 5 * MB
    source = formats.open_tensors(tmp_path / "views.pt")
    assert len(source) == 500 and source.shapes["v5"] == (1 << 21,)
    np.testing.assert_array_equal(source["v499"], base.float().numpy())
    reg = workdir / "registry"
    r = measured_trace(tmp_path / "views.pt", reg)
    assert r["rc"] == 1, r  # no carrier-shaped tensor: no watermark
    assert r["maxrss_mb"] <= 2 * on_disk(tmp_path / "views.pt") / MB + 500, r


# --- 4: non-finite weights ------------------------------------------------------------------------


def _with_carriers(state: dict[str, torch.Tensor], fill: float, fraction: float, seed: int = 0) -> dict:
    out = dict(state)
    g = torch.Generator().manual_seed(seed)
    for k in CARRIERS:
        w = state[k].clone().reshape(-1)
        idx = torch.randperm(w.numel(), generator=g)[: int(w.numel() * fraction)]
        w[idx] = fill
        out[k] = w.reshape(state[k].shape)
    return out


@pytest.mark.parametrize("fill", [float("inf"), float("-inf"), float("nan")])
def test_a_tenth_of_the_carriers_non_finite_still_names_the_buyer(workdir, issued, tmp_path, fill):
    state = load_file(buyer_file(issued, 2))
    save_file(_with_carriers(state, fill, 0.1), tmp_path / "c.safetensors")
    r = run("trace", tmp_path / "c.safetensors", "--json", registry=workdir / "registry")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "identified" and d["buyer"]["id"] == issued[1][2].id


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_carriers_all_non_finite_give_no_watermark(workdir, issued, tmp_path, fill):
    state = load_file(buyer_file(issued, 2))
    save_file(_with_carriers(state, fill, 1.0), tmp_path / "c.safetensors")
    r = run("trace", tmp_path / "c.safetensors", "--json", registry=workdir / "registry")
    assert r.exit_code == 1, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "no watermark" and d["buyer"] is None and d["colluders"] == []


def test_onnx_with_infinite_constants_still_traces(workdir, issued, tmp_path):
    """Attention masks are legitimately -inf: a file is never refused for holding them."""
    model = example.build()
    model.load_state_dict(load_file(buyer_file(issued, 1)))
    formats.export_onnx(model, torch.zeros(1, 1, 28, 28), tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    mask = np.triu(np.full((8, 8), -np.inf, np.float32), 1)
    m.graph.node.insert(0, helper.make_node("Constant", [], ["mask"], value=numpy_helper.from_array(mask, "mask")))
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert np.isinf(formats.open_tensors(tmp_path / "m.onnx")["mask"]).any()
    r = run("trace", tmp_path / "m.onnx", "--json", registry=workdir / "registry")
    assert r.exit_code == 0 and json.loads(r.stdout)["buyer"]["id"] == issued[1][1].id


# --- 5: decoys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("permuted", [False, True])
def test_renamed_carriers_among_200_decoys_each_are_found_quickly(workdir, issued, tmp_path, monkeypatch, permuted):
    from wmtrace import attacks

    state = load_file(buyer_file(issued, 0))
    if permuted:  # channels permuted and dummy channels added: shapes change, names stay
        state = attacks.permute(dict(state), 1.0, seed=3)
    rng = np.random.default_rng(5)
    leaked = dict(state)
    for k in CARRIERS:
        real = leaked.pop(k)
        for i in range(200):  # decoys first, named like the carrier; the real one last, renamed
            noise = rng.standard_normal(tuple(real.shape)) * float(real.std())
            leaked[f"{k}.decoy{i}"] = torch.from_numpy(noise.astype(np.float32))
        leaked[f"renamed.{k.replace('.', '_')}"] = real
    save_file(leaked, tmp_path / "decoys.safetensors")

    calls = []
    full_match = align._match
    monkeypatch.setattr(align, "_match", lambda *a, **k: calls.append(1) or full_match(*a, **k))
    start = time.perf_counter()
    r = run("trace", tmp_path / "decoys.safetensors", "--json", registry=workdir / "registry")
    elapsed = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["buyer"]["id"] == issued[1][0].id
    assert {c["found_as"] for c in d["carriers"]} == {f"renamed.{k.replace('.', '_')}" for k in CARRIERS}
    assert len(calls) <= len(CARRIERS) * align.MAX_CANDIDATES  # was one per decoy: 804
    assert elapsed < 60  # 36 s before the cap on a loaded 2-core machine; about 1 s with it when idle
