"""Seconds per issued buyer: wmtrace's issuing against the naive baseline, in one run.

Naive baseline = the paper's fine-tune-to-embed run one buyer after another: SGD on the task loss
plus lambda * BCE(sigmoid(X w), b) on the raw filter mean (lambda = 0.01, X ~ N(0, 1), as in
Uchida et al.), until every bit has the right sign. wmtrace = the `issue` path with its defaults
(activation-aware closed-form placement, self-check trace, fidelity measured on the 10,000 test
images, file write, registry record), and once more without the fidelity measurement. Both on the
same master and data. Compute is counted in forward-pass equivalents: a training sample costs
about three (forward + backward), an evaluated sample one.

    python benchmarks/bench_issue.py --buyers 3 --out benchmarks/results/issue.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import naive_buyer, write_json  # noqa: E402

from wmtrace import api  # noqa: E402
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.schemes.whitebox import Config  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buyers", type=int, default=3, help="buyers per method (naive, wmtrace)")
    ap.add_argument("--epochs", type=int, default=2, help="master training epochs")
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/issue.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(Path(tmp) / "registry", create=True)
        t0 = time.perf_counter()
        m = api.ensure_example(reg, epochs=args.epochs)
        master_seconds = time.perf_counter() - t0
        master_samples = args.epochs * (60000 // 64) * 64
        train = load_fashion_mnist("train")
        held_out = load_fashion_mnist("test")

        naive = [naive_buyer(reg, m, 10_000 + i, train, held_out, 0.01, args.max_steps) for i in range(args.buyers)]
        rss_before = peak_rss_mb()

        # Default issuing (fidelity measured on all 10,000 test images), then the same without the
        # measurement: the difference is what the fidelity check costs per buyer.
        t0 = time.perf_counter()
        ours = api.issue(reg, buyers=args.buyers, out=Path(tmp) / "out")
        ours_seconds = (time.perf_counter() - t0) / args.buyers
        rss_after_n = peak_rss_mb()
        t0 = time.perf_counter()
        api.issue(reg, buyers=args.buyers, out=Path(tmp) / "out2", eval_samples=0)
        bare_seconds = (time.perf_counter() - t0) / args.buyers
        rss_after_2n = peak_rss_mb()
        cfg = Config.of(m).embed

    naive_seconds = float(np.mean([r["seconds"] for r in naive]))
    forward_equivalents = 3 * master_samples  # a training sample costs about one forward and a 2x backward
    per_buyer_forwards = cfg.moment_samples / args.buyers + 10_000
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "master": {"seconds": master_seconds, "samples": master_samples, "accuracy": m.accuracy},
        "naive": {
            "per_buyer_seconds": naive_seconds,
            "per_buyer_samples": float(np.mean([r["samples"] for r in naive])),
            "buyers": naive,
        },
        "wmtrace": {
            "per_buyer_seconds": ours_seconds,
            "per_buyer_seconds_without_fidelity_check": bare_seconds,
            "per_buyer_training_samples": cfg.steps * cfg.batch_size,
            "per_buyer_forward_samples": per_buyer_forwards,
            "compute_fraction_of_master": (3 * cfg.steps * cfg.batch_size + per_buyer_forwards)
            / forward_equivalents,
            "compute_fraction_without_fidelity_check": (
                3 * cfg.steps * cfg.batch_size + cfg.moment_samples / args.buyers
            ) / forward_equivalents,
            "wall_fraction_of_master": ours_seconds / master_seconds,
            "wall_fraction_without_fidelity_check": bare_seconds / master_seconds,
            "agreement": [b.agreement for b in ours],
            "accuracy": [b.accuracy for b in ours],
            "margin": [b.margin for b in ours],
            "peak_rss_mb": {"before_issuing": rss_before, f"after_{args.buyers}": rss_after_n,
                            f"after_{2 * args.buyers}": rss_after_2n},
        },
        "speedup": naive_seconds / ours_seconds,
    }
    write_json(args.out, result)
    print(json.dumps(result["wmtrace"], indent=1))
    print(json.dumps({"speedup": result["speedup"], "naive_s": naive_seconds, "master_s": master_seconds}))


if __name__ == "__main__":
    main()
