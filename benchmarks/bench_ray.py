"""Issuing on Ray: buyers per hour with 1 and 2 Ray workers on this machine, beside one process
without Ray, on the same master and buyer count, and where each buyer's time goes.

    OMP_NUM_THREADS=1 python benchmarks/bench_ray.py [--buyers 6] [--eval-samples N] [--registry DIR]

The bundled Fashion-MNIST example (`api.ensure_example`, trained here unless `--registry` holds it).
Runs, one after another into the same registry: one process with 1 and with 2 torch threads, then
`issue(ray=True, ray_workers=W)` on a local Ray instance of 2 CPUs (one CPU, one thread per actor) for
W = 1 and 2. Per run: wall time from the call to its return (actors' start and the master's load
included), the steady rate between the first and the last copy done, the mean per-buyer split that
`_Run.one` records (place, fidelity, self_trace, write) and each worker's load time, and the load
averages before and after: other processes share the machine and are not stopped for this.

The projection: a worker issues 3600 / (place + fidelity + self_trace + write) buyers per hour once
loaded, so a cluster of N such workers (one CPU each, the disk shared) issues N times that.
Writes benchmarks/results/ray.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, write_json  # noqa: E402

from wmtrace import api  # noqa: E402

STEPS = ("place", "fidelity", "self_trace", "write")


def one_run(reg, label: str, buyers: int, out: Path, eval_samples: int | None, **kw) -> dict:
    """Issue `buyers` copies; wall time, steady rate, mean split, load averages around it."""
    done_at: dict[int, float] = {}  # first report of each count: repair steps of the next buyer repeat it
    load_before = os.getloadavg()
    start = time.perf_counter()
    issued = api.issue(reg, buyers=buyers, out=out / label.replace(" ", "-"), eval_samples=eval_samples,
                       progress=lambda done, *_: done_at.setdefault(done, time.perf_counter()), **kw)
    wall = time.perf_counter() - start
    marks = [done_at[i] for i in sorted(done_at) if i >= 1]
    split = {s: statistics.mean(b.extra["timings"].get(s, 0.0) for b in issued) for s in STEPS}
    per_buyer = sum(split.values())
    workers = {b.extra["worker"]["pid"]: b.extra["worker"]["load_s"] for b in issued if "worker" in b.extra}
    steady = (len(marks) - 1) / (marks[-1] - marks[0]) * 3600 if len(marks) > 1 and marks[-1] > marks[0] else None
    row = {
        "run": label, "buyers": len(issued), "ids": [issued[0].id, issued[-1].id], "wall_s": round(wall, 2),
        "buyers_per_hour": round(len(issued) / wall * 3600, 1),
        "steady_buyers_per_hour": round(steady, 1) if steady else None,
        "first_done_s": round(marks[0] - start, 2),
        "split_s": {k: round(v, 3) for k, v in split.items()}, "per_buyer_s": round(per_buyer, 3),
        "worker_load_s": sorted(round(v, 2) for v in workers.values()),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "agreement_min": min(b.agreement for b in issued) if issued[0].agreement is not None else None,
    }
    print(f"{label}: {row['buyers_per_hour']} buyers/h (steady {row['steady_buyers_per_hour']}), "
          f"split {row['split_s']}, load {row['loadavg_before']} -> {row['loadavg_after']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buyers", type=int, default=6, help="buyers per run")
    ap.add_argument("--eval-samples", type=int, default=None, help="held-out samples per fidelity check [all]")
    ap.add_argument("--registry", type=Path, default=None, help="a registry holding the example master")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ray.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        t0 = time.perf_counter()
        m = api.ensure_example(reg)
        setup_s = time.perf_counter() - t0
        print(f"master {m.name} ready in {setup_s:.0f} s", flush=True)
        rows = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows.append(one_run(reg, f"one process, {threads} thread{'s' * (threads > 1)}", args.buyers, Path(tmp),
                                args.eval_samples))
        # This run's own token (Ray's default for a new local instance is one written to ~/.ray).
        token = Path(tmp) / "ray_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        import ray

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="ERROR",
                 log_to_driver=False)
        try:
            for workers in (1, 2):
                rows.append(one_run(reg, f"ray, {workers} worker{'s' * (workers > 1)}", args.buyers, Path(tmp),
                                    args.eval_samples, ray=True, ray_workers=workers))
        finally:
            ray.shutdown()
        per_buyer = statistics.mean(r["per_buyer_s"] for r in rows if r["run"].startswith("ray"))
        result = run_info() | {
            "note": "2-core x86_64, no GPU; other processes shared the machine (load averages per run)",
            "master": m.name, "master_setup_s": round(setup_s, 1),
            "eval_samples": args.eval_samples if args.eval_samples is not None else m.config.eval_samples,
            "runs": rows,
            "projection": {
                "per_buyer_s_one_thread_worker": round(per_buyer, 3),
                "buyers_per_hour_per_worker": round(3600 / per_buyer, 1),
                "rule": "N loaded workers (one CPU each, shared disk) issue N x buyers_per_hour_per_worker",
            },
        }
        write_json(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
