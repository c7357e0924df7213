"""`issue --ray`: a real Ray cluster (a head and worker nodes started here on 127.0.0.1, one CPU each)
issues copies that trace to their buyers, with contiguous IDs; workers killed mid-run (one by SIGKILL,
one by a failpoint right after writing a copy and before completing it) lose and duplicate no buyer;
without --ray nothing of Ray is imported; a cluster that does not answer is one line, nothing reserved."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from tests import pg as fixtures
from wmtrace import api
from wmtrace.cli import app

ray = pytest.importorskip("ray")
MASTER = "small"
pg_server, pg_url, kek = fixtures.pg_server, fixtures.pg_url, fixtures.kek
NODE_START_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Ray nodes as `ray start --block` processes, each in its own process group, so that each one's
    processes (raylet, workers) are stopped by that group alone, never by name."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        # Ray's socket paths must fit in 107 bytes: its session folder cannot live under pytest's.
        self.sessions = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        # Without token authentication, said explicitly: a head node otherwise turns it on when a token
        # is in ~/.ray/auth_token (any earlier `ray.init()` leaves one), and this process, which read
        # Ray's settings when it imported ray, would be refused.
        self.env = pytest.MonkeyPatch()
        self.env.setenv("RAY_AUTH_MODE", "disabled")
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def start(self, head: bool = False, env: dict | None = None) -> subprocess.Popen:
        args = ["ray", "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                "--object-store-memory", str(100 * 2**20), "--dashboard-agent-listen-port", str(free_port())]
        if head:
            args += ["--head", "--port", str(self.port), "--include-dashboard=false", "--disable-usage-stats",
                     "--temp-dir", str(self.sessions), "--ray-client-server-port", str(free_port())]
        else:
            args += ["--address", self.address]
        log = open(self.tmp / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115 - kept by the process
        node = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | (env or {}))
        self.nodes.append(node)
        return node

    def wait_nodes(self, n: int) -> None:
        deadline = time.monotonic() + NODE_START_S
        while time.monotonic() < deadline:
            if any(node.poll() is not None for node in self.nodes):
                break
            if not ray.is_initialized():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
                except (OSError, ConnectionError):
                    time.sleep(0.5)
                    continue
            if sum(node["Alive"] for node in ray.nodes()) >= n:
                return
            time.sleep(0.5)
        raise AssertionError(f"{n} Ray nodes not up after {NODE_START_S} s; see {self.tmp}/node*.log")

    def stop(self, node: subprocess.Popen) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(node.pid, sig)
            except ProcessLookupError:
                return
            try:
                node.wait(timeout=5)
                os.killpg(node.pid, signal.SIGKILL)  # what the node left behind in its group
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(self.nodes):
            self.stop(node)
        shutil.rmtree(self.sessions, ignore_errors=True)
        self.env.undo()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("raycluster"))
    try:
        c.start(head=True)
        c.start()
        c.wait_nodes(2)
        yield c
    finally:
        c.close()


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_all_issued_once(reg, out: Path, first: int, count: int) -> list:
    """IDs 1..first+count-1 issued once each; this run's files exist, are registered and name their buyer."""
    buyers = sorted(reg.buyers(MASTER, status=None), key=lambda b: b.id)
    assert [b.id for b in buyers] == list(range(1, first + count))
    assert all(b.status == "issued" for b in buyers)
    assert len({b.name for b in buyers}) == len(buyers)
    ours = buyers[first - 1:]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == \
        sorted(f"{b.name}.safetensors" for b in ours)
    assert all((out / f"{b.name}.receipt.json").is_file() for b in ours)  # the driver's statement covers them
    issued = Counter(e["detail"]["id"] for e in reg.audit_log(limit=1000) if e["action"] == "issue")
    for b in ours:
        assert issued[b.id] == 1, f"buyer {b.id} completed {issued[b.id]} times"
        assert sha256(b.file) == b.sha256
        result = api.trace(b.file, reg)
        assert result.verdict == "identified" and result.buyer["id"] == b.id
    return ours


def test_copies_issued_on_a_cluster_trace_to_their_buyers(cluster, workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "solo", symlinks=True)
    reg = api.open_registry(workdir / "registry")
    out = workdir / "ray-out"
    seen = []
    issued = api.issue(reg, buyers=4, out=out, ray=cluster.address,
                       progress=lambda done, n, *_: seen.append((done, n)))
    assert [b.id for b in issued] == [4, 5, 6, 7]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len({b.extra["worker"]["pid"] for b in issued}) == 2  # both nodes' actors issued
    for b in issued:
        assert set(b.extra["timings"]) == {"place", "fidelity", "self_trace", "write"}
    check_all_issued_once(reg, out, 4, 4)
    # One process writes the same bytes for the same buyers: what makes re-dispatch safe.
    solo = api.issue(api.open_registry(tmp_path / "solo" / "registry"), buyers=4, out=tmp_path / "solo" / "out",
                     eval_samples=0)
    assert [b.sha256 for b in solo] == [b.sha256 for b in issued]


def test_killed_workers_lose_and_duplicate_no_buyer(cluster, workdir):
    """Three actors, one per node: the one on the node started with the failpoint dies right after
    writing its first copy (before completing it); the one on the other worker node is SIGKILLed
    when the first copy is done. The head's actor issues the rest, each buyer once."""
    doomed = cluster.start(env={"WMTRACE_FAILPOINT": "issue:written"})
    cluster.wait_nodes(3)
    victim = cluster.nodes[1]
    killed = []

    def kill_one(done, n, *_):
        if done == 1 and not killed:
            workers = [p for p in psutil.Process(victim.pid).children(recursive=True)
                       if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::_Worker")]
            for p in workers:
                p.send_signal(signal.SIGKILL)
            killed.extend(workers)

    reg = api.open_registry(workdir / "registry")
    out = workdir / "ray-out"
    issued = api.issue(reg, buyers=6, out=out, ray=cluster.address, progress=kill_one)
    assert killed, "no actor ran on the second node"
    assert [b.id for b in issued] == list(range(4, 10))
    assert sum(b.extra.get("redispatched", 0) for b in issued) >= 1  # at least the copy written, not completed
    check_all_issued_once(reg, out, 4, 6)
    cluster.stop(doomed)


def test_actors_complete_into_a_postgresql_registry(cluster, workdir, pg_url, kek, tmp_path):
    """A registry URL: every actor opens the database itself, the sealed key opened with the KEK file
    the driver names (forwarded to the actors; the nodes were started without it)."""
    with api.open_registry(workdir / "registry") as src:
        api.migrate_registry(src, pg_url, storage=str(tmp_path / "storage"))
    with api.open_registry(pg_url) as reg:
        issued = api.issue(reg, buyers=3, out=tmp_path / "out", ray=cluster.address, eval_samples=0)
        assert [b.id for b in issued] == [4, 5, 6]
        check_all_issued_once(reg, tmp_path / "out", 4, 3)


def test_patches_issued_on_a_cluster_materialize_to_the_registered_copy(cluster, workdir):
    reg = api.open_registry(workdir / "registry")
    issued = api.issue(reg, buyers=2, out=workdir / "patches", ray=cluster.address, eval_samples=0, store="patch")
    for b in issued:
        assert b.file.endswith(".wmpatch")
        full = workdir / f"{b.name}.safetensors"
        api.materialize(reg, b.id, full)
        assert sha256(str(full)) == b.sha256
        assert api.trace(full, reg).buyer == {"id": b.id, "name": b.name}


def test_without_ray_nothing_of_ray_is_imported(workdir):
    code = (
        "import sys; from wmtrace import api; from wmtrace.cli import app; "
        f"reg = api.open_registry({str(workdir / 'registry')!r}); "
        f"b = api.issue(reg, buyers=1, out={str(workdir / 'plain')!r}, eval_samples=0); "
        "print(len(b), 'ray' in sys.modules, any(m.startswith('ray.') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.stdout.split() == ["1", "False", "False"], done.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:{closed}", "nonsense"])
def test_a_cluster_that_does_not_answer_is_one_line_and_reserves_nothing(workdir, address):
    before = [b.id for b in api.open_registry(workdir / "registry").buyers(MASTER, status=None)]
    address = address.format(closed=free_port())
    r = CliRunner().invoke(app, ["issue", "--buyers", "2", "--ray", address, "--registry", str(workdir / "registry"),
                                 "--out", str(workdir / "o"), "--json"], catch_exceptions=False)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and address in lines[0], r.output
    after = api.open_registry(workdir / "registry")
    assert [b.id for b in after.buyers(MASTER, status=None)] == before
    assert not (workdir / "o").exists()


def test_ray_not_installed_is_one_line(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # how Python reports a package that is absent
    r = CliRunner().invoke(app, ["issue", "--buyers", "1", "--ray", "auto", "--registry", str(workdir / "registry")],
                           catch_exceptions=False)
    assert r.exit_code == 2
    assert r.output.strip() == "error: Ray is not installed: pip install 'wmtrace[ray]'"


def test_ray_workers_below_one_is_refused(workdir):
    r = CliRunner().invoke(app, ["issue", "--buyers", "1", "--ray", "auto", "--ray-workers", "0",
                                 "--registry", str(workdir / "registry")], catch_exceptions=False)
    assert r.exit_code == 2 and r.output.strip() == "error: --ray-workers must be at least 1"
