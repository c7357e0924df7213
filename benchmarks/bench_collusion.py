"""Collusion: merged copies of random buyers traced, innocents never accused; scoring speed.

    OMP_NUM_THREADS=1 python benchmarks/bench_collusion.py --registry REG --out benchmarks/results/collusion.json

REG is a registry holding the example master and its issued buyers (issued with `wmtrace issue`,
or by this script with --buyers N into a temporary registry when --registry is not given). For
every merge kind and colluder count, `--trials` random sets of issued buyers are merged
(`attacks.collude`) and traced (`pipeline.trace.trace_tensors`, the path of `wmtrace trace`). The same
extracted soft bits are then scored against larger registries (the issued buyers plus codewords of
buyers who bought but did not collude: only their codewords matter to an accusation) to show how
many colluders are caught for N buyers. Finally, scoring speed for 100,000 buyers on one core.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import SoftBits, example_accuracy, named, timed, write_json  # noqa: E402

from wmtrace import api, attacks
from wmtrace.coding import accuse, codes
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.pipeline.trace import trace_tensors  # noqa: E402


def speed(n: int = 100_000) -> dict:
    spec, key = codes.CodeSpec(), bytes(range(32))
    ids = np.arange(1, n + 1)
    t0 = time.perf_counter()
    words = codes.codewords(key, "bench", ids, spec)
    t_words = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    soft = np.unpackbits(words[[5, 77, 901]], axis=1).mean(0) * 2 - 1 + 0.3 * rng.normal(size=spec.bits)
    t_scores = timed(lambda: accuse.scores(soft, words, spec), 5)
    t_accuse = timed(lambda: accuse.accuse(soft, words, spec), 5)
    return {"buyers": n, "codewords_s": t_words, "scores_s": t_scores, "accuse_s": t_accuse,
            "accused": [int(a.index) for a in accuse.accuse(soft, words, spec)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="registry with the example master and issued buyers")
    ap.add_argument("--buyers", type=int, default=50, help="buyers to issue when no --registry is given")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--sizes", default="2,3,4,5,8")
    ap.add_argument("--how", default="average,majority,layers")
    ap.add_argument("--accuracy-trials", type=int, default=10, help="trials per cell whose merged model is evaluated")
    ap.add_argument("--accuracy-samples", type=int, default=2000, help="test images for the merged model's accuracy")
    ap.add_argument("--scaled", default="50,1000,100000", help="registry sizes for the score-only analysis")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/collusion.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    root = args.registry
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="wmtrace-collusion-")) / "registry"
        reg = api.open_registry(root, create=True)
        api.ensure_example(reg)
        api.issue(reg, buyers=args.buyers, out=root.parent / "buyers", master=api.EXAMPLE_MASTER)
    reg = api.open_registry(root)
    m = reg.master(api.EXAMPLE_MASTER)
    buyers = reg.buyers(m.name)
    ids = np.array([b.id for b in buyers])
    states = [load_file(b.file) for b in buyers]
    read = SoftBits(reg, m, metrics=False)
    key, spec = read.key, read.spec
    inputs, labels = load_fashion_mnist("test", limit=args.accuracy_samples)
    master_accuracy_subset = example_accuracy(load_file(str(m.weights)), inputs, labels)
    scaled = [int(s) for s in args.scaled.split(",")]
    extra = {n: codes.codewords(key, m.name, np.arange(1, max(n, ids.max()) + 1), spec) for n in scaled}
    print(f"{len(buyers)} issued buyers; master accuracy {m.accuracy:.4f} ({master_accuracy_subset:.4f} on the subset)",
          flush=True)

    rng = np.random.default_rng(args.seed)
    cells = []
    for how in args.how.split(","):
        for k in [int(s) for s in args.sizes.split(",")]:
            if k > len(buyers):
                continue
            rows, t0 = [], time.perf_counter()
            for trial in range(args.trials):
                pick = sorted(rng.choice(len(buyers), size=k, replace=False).tolist())
                guilty = {int(ids[i]) for i in pick}
                merged = attacks.collude([states[i] for i in pick], how)
                tensors = {n: v.numpy() for n, v in merged.items() if v.is_floating_point()}
                r = trace_tensors(tensors, reg, master=m.name)
                accused = named(r)
                soft = read(tensors)
                z = accuse.scores(soft, extra[scaled[-1]], spec)
                gmask = np.zeros(len(z), dtype=bool)
                gmask[[g - 1 for g in guilty]] = True
                row = {
                    "colluders": sorted(guilty), "verdict": r.verdict, "named": sorted(accused),
                    "true_named": len(accused & guilty), "innocents_named": len(accused - guilty),
                    "max_bound": r.false_positive_probability if accused else None,
                    "colluder_scores": [round(float(s), 3) for s in z[gmask]],
                    "max_innocent_score_issued": float(np.max(np.delete(z[: ids.max()], [g - 1 for g in guilty]))),
                }
                for n in scaled:
                    zn = z[: max(n, ids.max())]
                    t = accuse.threshold(len(zn), 1e-6)
                    row[f"score_caught_N{n}"] = int((zn[gmask[: len(zn)]] >= t).sum())
                    row[f"score_innocents_N{n}"] = int((np.delete(zn, [g - 1 for g in guilty]) >= t).sum())
                if trial < args.accuracy_trials:
                    row["accuracy"] = example_accuracy(merged, inputs, labels)
                rows.append(row)
            acc = [r["accuracy"] for r in rows if "accuracy" in r]
            cell = {
                "how": how, "colluders": k, "trials": len(rows),
                "at_least_one_named": float(np.mean([r["true_named"] > 0 for r in rows])),
                "mean_colluders_named": float(np.mean([r["true_named"] for r in rows])),
                "innocents_accused": int(sum(r["innocents_named"] for r in rows)),
                "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in {r["verdict"] for r in rows}},
                "max_innocent_score": float(max(r["max_innocent_score_issued"] for r in rows)),
                "mean_colluder_score": float(np.mean([np.mean(r["colluder_scores"]) for r in rows])),
                "accuracy_mean": float(np.mean(acc)) if acc else None,
                "accuracy_min": float(np.min(acc)) if acc else None,
                "seconds_per_trial": (time.perf_counter() - t0) / len(rows),
                "scaled": {
                    n: {"at_least_one": float(np.mean([r[f"score_caught_N{n}"] > 0 for r in rows])),
                        "mean_caught": float(np.mean([r[f"score_caught_N{n}"] for r in rows])),
                        "innocents": int(sum(r[f"score_innocents_N{n}"] for r in rows)),
                        "threshold": accuse.threshold(max(n, int(ids.max())), 1e-6)}
                    for n in scaled
                },
                "rows": rows,
            }
            cells.append(cell)
            print(json.dumps({k2: v for k2, v in cell.items() if k2 != "rows"}), flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or ''}".strip(", "),
        "python": platform.python_version(), "torch": torch.__version__,
        "registry_buyers": len(buyers), "master_accuracy": m.accuracy, "master_accuracy_subset": master_accuracy_subset,
        "buyer_accuracy": [b.accuracy for b in buyers], "max_false_positive": 1e-6,
        "accuracy_samples": args.accuracy_samples, "accuracy_trials": args.accuracy_trials,
        "threshold": accuse.threshold(len(buyers), 1e-6), "cells": cells, "speed": speed(),
    }
    print(json.dumps(result["speed"]), flush=True)
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
