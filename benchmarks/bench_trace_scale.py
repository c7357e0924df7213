"""Trace against a registry of 100,000 buyers, beside the same trace against a registry of one.

    OMP_NUM_THREADS=1 python benchmarks/bench_trace_scale.py --trained CACHED_EXAMPLE.safetensors \
        --buyers 100000 --out benchmarks/results/trace_scale.json

One copy of the example master is issued for real; the large registry is a copy of that registry whose
other 99,999 buyers are rows as `issue` records them (status issued, codeword) without their files:
scoring reads the rows, never the files, and issuing 100,000 real copies is not what is measured.
Each figure is the best of `--repeat` traces in this process (`warm`), or of the first trace in a
fresh process (`cold`: reads the stored codeword table; `cold_no_codebook`: the table deleted first,
so the trace computes every codeword as each trace did before the table existed).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import example_master, run_info, timed, write_json  # noqa: E402

from wmtrace import api  # noqa: E402
from wmtrace.coding import codes  # noqa: E402

COLD = """
import sys, time
t0 = time.perf_counter()
from wmtrace import api
reg = api.open_registry(sys.argv[1])
t1 = time.perf_counter()
r = api.trace(sys.argv[2], reg)
t2 = time.perf_counter()
assert r.buyer is not None and r.buyer["id"] == int(sys.argv[3]), r.verdict
print(t2 - t1)
"""


def fill(db: Path, master: str, key: bytes, spec: codes.CodeSpec, total: int) -> None:
    """Add issued buyer rows up to `total` buyers, as `issue` records them (in one transaction)."""
    conn = sqlite3.connect(db)
    (top,) = conn.execute("SELECT MAX(id) FROM buyers WHERE master = ?", (master,)).fetchone()
    ids = np.arange(top + 1, total + 1)
    words = codes.codewords(key, master, ids, spec)
    now = time.time()
    rows = [(master, int(i), f"buyer-{i:06d}", "issued", w.tobytes().hex(), now)
            for i, w in zip(ids, words, strict=True)]
    with conn:
        conn.executemany("INSERT INTO buyers (master, id, name, status, codeword, created) VALUES (?, ?, ?, ?, ?, ?)",
                         rows)
    conn.close()


def cold(registry: Path, leak: str, buyer: int, drop_cache: bool = False) -> float:
    if drop_cache:  # the first trace after the registry grew: the codeword table is rebuilt
        for p in (registry / "cache").glob("*.codebook"):
            p.unlink()
    out = subprocess.run([sys.executable, "-c", COLD, str(registry), leak, str(buyer)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def on_postgres(server: str, small_root: Path, large_root: Path, b, repeat: int, buyers: int) -> dict:
    """The same traces against the two registries migrated to fresh PostgreSQL databases."""
    import os
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    os.environ["WMTRACE_KEK"] = secrets.token_hex(32)  # inherited by the cold-trace processes
    rows, made = {}, []
    try:
        for label, root in (("postgresql, 1 buyer", small_root), (f"postgresql, {buyers:,} buyers", large_root)):
            name = f"wmtrace_bench_{secrets.token_hex(4)}"
            with psycopg.connect(server, autocommit=True) as c:
                c.execute(f"CREATE DATABASE {name}")
            made.append(name)
            url = urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
            t0 = time.perf_counter()
            with api.open_registry(root) as src:
                api.migrate_registry(src, url, storage=str(root.parent / f"{name}-storage"))
            migrate_s = time.perf_counter() - t0
            reg = api.open_registry(url)
            result = api.trace(b.file, reg)
            assert result.buyer is not None and result.buyer["id"] == b.id, result.verdict
            rows[label] = {"migrate_s": round(migrate_s, 2),
                           "cold_s": min(cold(url, b.file, b.id) for _ in range(max(1, repeat // 2))),
                           "warm_s": timed(lambda r=reg: api.trace(b.file, r), repeat)}
            reg.close()
    finally:
        with psycopg.connect(server, autocommit=True) as c:
            for name in made:
                c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/trace_scale.json"))
    ap.add_argument("--trained", type=Path, help="an already trained example master (skips training)")
    ap.add_argument("--buyers", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--postgres", help="also measure both registries migrated to PostgreSQL: a server URL whose "
                    "role may create databases (two are made and dropped; a KEK is generated for the run)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        small_root, large_root = Path(tmp) / "one", Path(tmp) / "large"
        reg = api.open_registry(small_root, create=True)
        m = example_master(reg, args.trained)
        (b,) = api.issue(reg, buyers=1, out=Path(tmp) / "out", eval_samples=0)
        reg.close()
        shutil.copytree(small_root, large_root)
        large = api.open_registry(large_root)
        t0 = time.perf_counter()
        fill(large_root / "wmtrace.db", m.name, large.key(m.name), m.config.code, args.buyers)
        fill_s = time.perf_counter() - t0
        large.close()

        rows = {}
        for label, root in (("1 buyer", small_root), (f"{args.buyers:,} buyers", large_root)):
            reg = api.open_registry(root)
            result = api.trace(b.file, reg)
            assert result.buyer is not None and result.buyer["id"] == b.id, result.verdict
            rows[label] = {
                "cold_no_codebook_s": min(cold(root, b.file, b.id, True) for _ in range(max(1, args.repeat // 2))),
                "cold_s": min(cold(root, b.file, b.id) for _ in range(max(1, args.repeat // 2))),
                "warm_s": timed(lambda r=reg: api.trace(b.file, r), args.repeat),
                "bound": result.false_positive_probability,
            }
            reg.close()
        if args.postgres:
            rows |= on_postgres(args.postgres, small_root, large_root, b, args.repeat, args.buyers)
        small, large_row = rows["1 buyer"], rows[f"{args.buyers:,} buyers"]
        result = {
            **run_info(), "buyers": args.buyers, "fill_rows_s": round(fill_s, 2), "traces": rows,
            "extra_cold_s": round(large_row["cold_s"] - small["cold_s"], 3),
            "extra_warm_s": round(large_row["warm_s"] - small["warm_s"], 3),
        }
        if args.postgres:
            pg_small, pg_large = rows["postgresql, 1 buyer"], rows[f"postgresql, {args.buyers:,} buyers"]
            result["postgresql_extra_cold_s"] = round(pg_large["cold_s"] - pg_small["cold_s"], 3)
            result["postgresql_extra_warm_s"] = round(pg_large["warm_s"] - pg_small["warm_s"], 3)
        write_json(args.out, result)
        print(result)


if __name__ == "__main__":
    main()
