"""Many issuing processes on one PostgreSQL registry: IDs never handed out twice, every copy named.

N processes (`wmtrace issue --buyers K --eval-samples 0`, the bundled example CNN) start together on one
database; then every issued ID is checked (1..N*K, no duplicate, no reservation left) and copies are traced
against the database (an evenly spaced sample, `--trace-sample`; 0 traces all). A fresh database is made on
the server (`--server`, default $WMTRACE_TEST_PG, else a private cluster as in tests/pg.py); `--master` seeds
the example's trained weights into the storage cache so the run measures registration and issuing, not
training (without it the example is trained first).

    python benchmarks/bench_postgres.py --procs 8 --buyers 125 --trace-sample 100 \\
        --master ~/.cache/fashion-cnn.safetensors --out benchmarks/results/postgres.json
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
from _common import run_info, write_json  # noqa: E402

from tests.pg import _private_cluster, database_url  # noqa: E402
from wmtrace import api, registry  # noqa: E402


def wmtrace(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "wmtrace", *args], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=f)


def run(args: argparse.Namespace, server: str, work: Path) -> dict:
    name = f"wmtrace_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    url = database_url(server, name)
    kek = work / "kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    storage = work / "storage"
    env = {**os.environ, "WMTRACE_KEK_FILE": str(kek), "WMTRACE_STORAGE": str(storage), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    if args.master:
        (storage / "cache").mkdir(parents=True)
        shutil.copyfile(args.master, storage / "cache" / f"{api.EXAMPLE_MASTER}.safetensors")
    t0 = time.perf_counter()
    p = wmtrace(["init", "--registry", url], env, work / "init.log")
    if p.wait() != 0:
        raise SystemExit(f"init failed: {(work / 'init.log').read_text()[-500:]}")
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [wmtrace(["issue", "--registry", url, "--buyers", str(args.buyers), "--eval-samples", "0",
                      "--out", str(work / f"p{i}")], env, work / f"p{i}.log") for i in range(args.procs)]
    failed = [(i, (work / f"p{i}.log").read_text()[-500:]) for i, p in enumerate(procs) if p.wait() != 0]
    issue_s = time.perf_counter() - t0
    os.environ["WMTRACE_KEK_FILE"] = str(kek)
    with registry.open(url) as reg:
        buyers = reg.buyers()
        ids = sorted(b.id for b in buyers)
        total = args.procs * args.buyers
        step = max(1, len(buyers) // args.trace_sample) if args.trace_sample else 1
        sample = buyers[::step]
        t0 = time.perf_counter()
        named = sum(api.trace(b.file, reg).buyer == {"id": b.id, "name": b.name} for b in sample)
        trace_s = time.perf_counter() - t0
        reserved = len(reg.buyers(status="reserved"))
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"DROP DATABASE {name} WITH (FORCE)")
    return {
        "processes": args.procs, "buyers_per_process": args.buyers, "failed_processes": failed,
        "issued": len(buyers), "expected": total, "duplicate_ids": len(ids) - len(set(ids)),
        "ids_contiguous": ids == list(range(1, total + 1)), "reservations_left": reserved,
        "init_seconds": round(init_s, 1), "issue_wall_seconds": round(issue_s, 1),
        "buyers_per_hour": round(len(buyers) / issue_s * 3600),
        "traced": len(sample), "traced_to_their_buyer": named,
        "trace_seconds_per_copy": round(trace_s / len(sample), 2),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--buyers", type=int, default=125, help="buyers per process")
    ap.add_argument("--trace-sample", type=int, default=100, help="copies traced, evenly spaced (0: all)")
    ap.add_argument("--master", type=Path, help="the example's trained weights (skips training)")
    ap.add_argument("--server", default=os.environ.get("WMTRACE_TEST_PG"), help="PostgreSQL server URL")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/postgres.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="wmtrace-bench-pg-") as tmp:
        work, stop = Path(tmp), None
        server = args.server
        if not server:
            (work / "pg").mkdir()
            server, stop = _private_cluster(work / "pg")
        try:
            result = run(args, server, work)
        finally:
            if stop:
                subprocess.run(stop, capture_output=True)
    write_json(args.out, {**run_info(), "command": " ".join(sys.argv), **result}, newline=True)
    print({k: v for k, v in result.items() if k != "failed_processes"}, "failed:", len(result["failed_processes"]))


if __name__ == "__main__":
    main()
