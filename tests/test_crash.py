"""No interruption loses a key or a registered copy.

Each case kills a real `wmtrace` process with SIGKILL at a named step (`wmtrace.failpoint`), as a power
cut or the OOM killer would, then runs the command again and traces every copy issued before: each
must still name its own buyer. Concurrent first runs are covered the same way.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wmtrace import api

ROOT = Path(__file__).resolve().parents[1]
# Minimal-norm placement on unlabeled inputs, white-box only: the quickest real registration (about 2 s).
# What is killed here is the registry's bookkeeping, the same whatever the schemes.
INIT = ["init", "--name", "small", "--placement", "minimal-norm", "--data", "tests.smalldata:unlabeled",
        "--schemes", "whitebox"]


def wmtrace(*args, registry: Path, failpoint: str | None = None, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WMTRACE_FAILPOINT", None)
    if failpoint:
        env["WMTRACE_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "wmtrace", *map(str, args), "--registry", str(registry)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def issued(registry: Path) -> list[dict]:
    with api.open_registry(registry) as reg:
        return [b.public() for b in reg.buyers()]


def assert_every_copy_traces(registry: Path, expected: int) -> None:
    """Traced in this process: the command under test is the one that was killed, not trace."""
    buyers = issued(registry)
    assert len(buyers) == expected
    assert sorted(b["id"] for b in buyers) == list(range(1, expected + 1)), "a hole or a duplicate in the IDs"
    with api.open_registry(registry) as reg:
        for b in buyers:
            assert api.trace(b["file"], reg).buyer == {"id": b["id"], "name": b["name"]}


def issue(registry: Path, out: Path, n: int) -> None:
    with api.open_registry(registry) as reg:
        assert len(api.issue(reg, buyers=n, out=out, eval_samples=0)) == n


def key_bytes(registry: Path) -> bytes | None:
    key = registry / "keys" / "small.key"
    return key.read_bytes() if key.exists() else None


@pytest.mark.parametrize("point", ["init:weights", "init:key", "init:registered"])
def test_init_killed_at_each_step(tmp_path, master_file, point):
    reg = tmp_path / "registry"
    r = wmtrace(*INIT, "--weights", master_file, registry=reg, failpoint=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = key_bytes(reg)
    again = wmtrace(*INIT, "--weights", master_file, registry=reg)
    if point == "init:registered":
        assert again.returncode == 2 and "already registered" in again.stderr
    else:
        assert again.returncode == 0, again.stderr
    if left is not None:
        assert key_bytes(reg) == left, "a key file written before the crash was replaced"
    issue(reg, tmp_path / "out", 2)
    assert_every_copy_traces(reg, 2)


@pytest.fixture
def one_issued(tmp_path, master_file) -> Path:
    reg = tmp_path / "registry"
    with api.open_registry(reg, create=True) as r:
        api.init(r, "small", master_file, "wmtrace.example:build", data="tests.smalldata:unlabeled",
                 placement="minimal-norm", scheme_names=["whitebox"])
    issue(reg, tmp_path / "out", 1)
    return reg


@pytest.mark.parametrize("point", ["issue:reserved", "issue:written", "issue:completed"])
def test_issue_killed_at_each_step(tmp_path, one_issued, point):
    reg = one_issued
    before = key_bytes(reg)
    r = wmtrace("issue", "--buyers", "2", "--eval-samples", "0", "--out", tmp_path / "out", registry=reg,
                failpoint=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    done = 1 + (point == "issue:completed")
    assert len(issued(reg)) == done
    # The dead run's reservations are taken over: `--buyers N` counts them among its N.
    r = wmtrace("issue", "--buyers", "2", "--eval-samples", "0", "--out", tmp_path / "out", registry=reg)
    assert r.returncode == 0, r.stderr
    assert key_bytes(reg) == before
    assert_every_copy_traces(reg, done + 2)


def test_concurrent_first_inits_register_once_and_keep_the_key(tmp_path, master_file):
    reg = tmp_path / "registry"
    procs = [wmtrace(*INIT, "--weights", master_file, registry=reg, wait=False) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2], results
    assert all("already registered" in err for code, err in results if code == 2)
    issue(reg, tmp_path / "out", 1)
    assert_every_copy_traces(reg, 1)


def test_concurrent_first_issues_set_up_the_example_once(tmp_path, master_file):
    """Two `issue` runs on a fresh registry both bootstrap the bundled example: once deleted its key."""
    reg = tmp_path / "registry"
    cache = reg / "cache" / "fashion-cnn.safetensors"  # the example master, already trained
    cache.parent.mkdir(parents=True)
    cache.write_bytes(master_file.read_bytes())
    procs = [wmtrace("issue", "--buyers", "1", "--eval-samples", "0", "--out", tmp_path / f"o{i}", "--json",
                     registry=reg, wait=False) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    assert_every_copy_traces(reg, 2)
