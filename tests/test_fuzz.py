"""Every reader fuzzed: a buyer's copy as safetensors, as a sharded folder with its index, as ONNX
and as PyTorch checkpoints (zip and legacy), each mutated with a fixed seed (byte flips,
truncations, header-length and JSON header edits, ONNX dims and data-type edits, pickle edits).

Whatever the mutation, `trace` either refuses the file (exit 2, one `error:` line, the registry
unchanged) or gives a verdict (exit 0 or 1) that names no buyer but the copy's own; never a
traceback, never a hang, and memory bounded by the files' size. All cases run in one child
process that calls the CLI in-process, so the whole fuzz costs one interpreter start."""

import json
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file

from wmtrace import example, formats

SEED = 20240612
PER_KIND = {"safetensors": 80, "sharded": 60, "onnx": 80, "checkpoint": 70, "legacy": 30}  # 325 cases: 13 s
CASE_TIMEOUT_S = 30
MB = 1 << 20

DRIVER = r"""
import hashlib, json, resource, signal, sys, time
from pathlib import Path
from typer.testing import CliRunner
from wmtrace.cli import app

class Hang(BaseException):  # not an Exception: the CLI's catch-all must not turn it into an error line
    pass

def expire(*_):
    raise Hang()

def snapshot(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}

cases, registry, timeout = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2], int(sys.argv[3])
runner = CliRunner()
signal.signal(signal.SIGALRM, expire)
for case in cases:
    before = snapshot(registry)
    start = time.perf_counter()
    signal.alarm(timeout)
    try:
        r = runner.invoke(app, ["trace", case["path"], "--json", "--registry", registry])
        out = {"rc": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
               "exception": None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)}
    except Hang:
        out = {"rc": "hang", "stdout": "", "stderr": "", "exception": None}
    finally:
        signal.alarm(0)
    out.update(id=case["id"], seconds=round(time.perf_counter() - start, 2), changed=snapshot(registry) != before,
               maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out), flush=True)
"""

# Starts the driver and reports its peak memory. A child's ru_maxrss starts from its parent's
# memory at fork (and survives exec), so the driver is started from this small fresh process,
# never from pytest itself, whose own peak would be counted.
MEASURE = r"""
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], stdout=sys.stdout, stderr=sys.stderr)
print(json.dumps({"rc": p.returncode, "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


# --- mutations ------------------------------------------------------------------------------------


def flip(rng: random.Random, data: bytes, limit: int | None = None) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        b[rng.randrange(min(len(b), limit or len(b)))] = rng.randrange(256)
    return bytes(b)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def safetensors_header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def edit_header(rng: random.Random, data: bytes) -> bytes:
    header, body = safetensors_header(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    edit = rng.randrange(8)
    if edit == 0:
        entry["shape"] = [rng.choice([0, 1, 3, 1 << 20, 1 << 40, 2**63 - 1])] + entry["shape"][1:]
    elif edit == 1:
        entry["shape"] = [d * 2 for d in entry["shape"]]
    elif edit == 2:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "XX", "F8_E4M3"])
    elif edit == 3:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 4, b], [a, 1 << 40], [-1, b], [a, a]])
    elif edit == 4:
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])  # overlap another tensor
    elif edit == 5:
        del header[name]
    elif edit == 6:
        header[name] = rng.choice([None, [], "x", {"dtype": "F32"}, {"dtype": "F32", "shape": "big"}])
    else:
        header[f"{name}_scale"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        entry["dtype"] = "I8"  # turns it into a quantized weight whose data does not fit
    return with_header(header, body)


def edit_length(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) + 1, 2**32, 2**63 - 1, 2**64 - 1])
    return struct.pack("<Q", new) + data[8:]


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    how = rng.randrange(5)
    if how == 0:
        return flip(rng, data, limit=8 + n)  # in the header: in the weights it is only noise
    if how == 1:
        return flip(rng, data)
    if how == 2:
        return truncate(rng, data)
    if how == 3:
        return edit_length(rng, data)
    return edit_header(rng, data)


def mutate_index(rng: random.Random, text: str) -> str:
    index = json.loads(text)
    weights = index["weight_map"]
    how = rng.randrange(6)
    if how == 0:
        return text[: rng.randrange(len(text))]
    if how == 1:
        index["weight_map"] = rng.choice([[], None, "x", {}, {"a": 3}])
    elif how == 2:
        k = rng.choice(list(weights))
        weights[k] = rng.choice(["../outside.safetensors", "/etc/passwd", "missing.safetensors", "", ".", "sub/"])
    elif how == 3:
        del index["weight_map"]
    elif how == 4:
        for k in list(weights)[: len(weights) // 2]:
            del weights[k]  # some shards no longer listed
    else:
        return text.replace('"', "'", rng.randint(1, 5))
    return json.dumps(index)


def mutate_onnx(rng: random.Random, data: bytes) -> bytes:
    how = rng.randrange(4)
    if how == 0:
        return flip(rng, data)
    if how == 1:
        return truncate(rng, data)
    model = onnx.load_from_string(data)
    init = rng.choice(list(model.graph.initializer))
    if how == 2:
        dims = list(init.dims) or [1]
        i = rng.randrange(len(dims))
        dims[i] = rng.choice([0, -1, dims[i] * 2, dims[i] + 1, 1 << 40, 2**62])
        if rng.random() < 0.3:
            dims = dims[:-1] if len(dims) > 1 else dims + [2]
        init.dims[:] = dims
    else:
        T = onnx.TensorProto
        init.data_type = rng.choice([T.FLOAT16, T.BFLOAT16, T.INT4, T.UINT4, T.STRING, T.UNDEFINED, T.DOUBLE,
                                     T.INT8, T.FLOAT8E4M3FN, T.BOOL, 999])
    return model.SerializeToString()


def mutate_pickle(rng: random.Random, pkl: bytes) -> bytes:
    b = bytearray(pkl)
    how = rng.randrange(3)
    if how == 0:
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:  # a small int argument (a size, a stride, an offset, a storage numel) made huge
        spots = [i for i in range(len(b) - 1) if b[i] == ord("K")]
        if spots:
            i = rng.choice(spots)
            b[i : i + 2] = b"J" + struct.pack("<i", rng.choice([2**31 - 1, 1 << 28, -1, 0]))
    else:
        return bytes(b[: rng.randrange(len(b))])
    return bytes(b)


def mutate_zip(rng: random.Random, path: Path, out: Path) -> None:
    how = rng.randrange(4)
    data = path.read_bytes()
    if how == 0:
        out.write_bytes(flip(rng, data))
    elif how == 1:
        out.write_bytes(truncate(rng, data))
    else:  # the pickle edited, the archive rewritten as torch would (stored members)
        src = zipfile.ZipFile(path)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for info in src.infolist():
                member = src.read(info.filename)
                if info.filename.endswith("data.pkl"):
                    member = mutate_pickle(rng, member)
                z.writestr(info, member)


def mutate_legacy(rng: random.Random, data: bytes) -> bytes:
    how = rng.randrange(3)
    if how == 0:
        return flip(rng, data, limit=2048)  # the pickles and storage headers come first
    if how == 1:
        return truncate(rng, data)
    return mutate_pickle(rng, data[:4096]) + data[4096:]


# --- cases ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_cases(issued, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    buyer = issued[1][0]
    state = load_file(buyer.file)
    base = root / "base"
    base.mkdir()
    formats.save_safetensors(state, base / "copy.safetensors")
    formats.save_sharded(state, base / "sharded", shards=3)
    model = example.build()
    model.load_state_dict(state)
    formats.export_onnx(model, torch.zeros(1, 1, 28, 28), base / "copy.onnx")
    torch.save(state, base / "copy.pt")
    torch.save(state, base / "legacy.pt", _use_new_zipfile_serialization=False)

    rng = random.Random(SEED)
    cases = []

    def add(path: Path) -> None:
        cases.append({"id": f"{len(cases):03d}-{path.relative_to(root)}", "path": str(path), "buyer": buyer.id})

    st = (base / "copy.safetensors").read_bytes()
    for i in range(PER_KIND["safetensors"]):
        (root / f"s{i}.safetensors").write_bytes(mutate_safetensors(rng, st))
        add(root / f"s{i}.safetensors")
    shards = sorted(p.name for p in (base / "sharded").glob("*.safetensors"))
    for i in range(PER_KIND["sharded"]):
        folder = root / f"sharded{i}"
        folder.mkdir()
        for p in (base / "sharded").iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        if rng.random() < 0.4:
            index = folder / "model.safetensors.index.json"
            index.write_text(mutate_index(rng, index.read_text()))
        else:
            shard = folder / rng.choice(shards)
            shard.write_bytes(mutate_safetensors(rng, shard.read_bytes()))
        add(folder if rng.random() < 0.5 else folder / "model.safetensors.index.json")
    ox = (base / "copy.onnx").read_bytes()
    for i in range(PER_KIND["onnx"]):
        (root / f"o{i}.onnx").write_bytes(mutate_onnx(rng, ox))
        add(root / f"o{i}.onnx")
    for i in range(PER_KIND["checkpoint"]):
        mutate_zip(rng, base / "copy.pt", root / f"c{i}.pt")
        add(root / f"c{i}.pt")
    legacy = (base / "legacy.pt").read_bytes()
    for i in range(PER_KIND["legacy"]):
        (root / f"l{i}.pt").write_bytes(mutate_legacy(rng, legacy))
        add(root / f"l{i}.pt")
    for name in ("copy.safetensors", "sharded", "copy.onnx", "copy.pt", "legacy.pt"):  # controls: unmutated
        add(base / name)
    largest = max(sum(p.stat().st_size for p in Path(c["path"]).rglob("*") if p.is_file()) if Path(c["path"]).is_dir()
                  else Path(c["path"]).stat().st_size for c in cases)
    return cases, largest


def test_every_reader_survives_mutated_files(fuzz_cases, workdir, tmp_path, issued):
    cases, largest = fuzz_cases
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # small matrices: threads only contend with other work on a shared machine
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-c", DRIVER, str(tmp_path / "cases.json"),
           str(workdir / "registry"), str(CASE_TIMEOUT_S)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results, (memory,) = lines[:-1], lines[-1:]
    assert proc.returncode == 0 and memory["rc"] == 0, proc.stderr[-3000:]
    assert len(results) == len(cases)
    others = {b.id for b in issued[1]} - {cases[0]["buyer"]}
    verdicts = {0: 0, 1: 0, 2: 0}
    for case, r in zip(cases, results, strict=True):
        where = f"{case['id']}: {r}"
        assert r["rc"] in (0, 1, 2), where  # "hang" when the per-case alarm fired
        assert r["exception"] is None and "Traceback" not in r["stdout"] + r["stderr"], where
        verdicts[r["rc"]] += 1
        if r["rc"] == 2:
            lines_ = r["stderr"].strip().splitlines()
            assert len(lines_) == 1 and lines_[0].startswith("error:"), where
            assert not r["changed"], f"registry changed by a refused file: {where}"
            continue
        d = json.loads(r["stdout"])
        named = ({d["buyer"]["id"]} if d["buyer"] else set()) | {c["id"] for c in d["colluders"]}
        assert not named & others, f"another buyer accused: {where}"
        assert named <= {case["buyer"]}, where
    for r in results[-5:]:  # the unmutated controls
        assert r["rc"] == 0 and json.loads(r["stdout"])["buyer"]["id"] == cases[0]["buyer"], r
    assert verdicts[2] > len(cases) // 4 and verdicts[0] > 5, verdicts  # both paths really exercised
    steps = [(b["maxrss_mb"] - a["maxrss_mb"], b["id"]) for a, b in zip(results, results[1:], strict=False)]
    assert memory["maxrss_mb"] <= 2 * largest / MB + 500, (memory, max(steps))
