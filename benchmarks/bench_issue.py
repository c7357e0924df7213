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
import torch.nn.functional as F

from wmtrace import api, codes, fidelity, modelio
from wmtrace.carriers import Carrier
from wmtrace.data import load_fashion_mnist


def naive_buyer(reg, m, buyer_id: int, train, held_out, lr: float, max_steps: int, keep_state: bool = False):
    """The paper's regularizer, fine-tune-to-embed, until all bits are embedded; with `keep_state`,
    (figures, the copy's state dict)."""
    key = reg.key(m.name)
    spec = codes.CodeSpec(**m.config["code"])
    bits = torch.from_numpy(codes.codeword(key, m.name, buyer_id, spec).astype(np.float32))
    carriers = [Carrier.from_dict(d) for d in m.config["carriers"]]
    xs = [torch.from_numpy(c.projection(key)).float() for c in carriers]
    master = modelio.build_model(m)
    model = modelio.build_model(m)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = train
    g = torch.Generator().manual_seed(buyer_id)
    t0, step = time.perf_counter(), 0
    while step < max_steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            j = perm[i : i + 64]
            model.train()
            loss = F.cross_entropy(model(x[j]), y[j])
            reg_loss = 0.0
            correct = True
            for c, xm in zip(carriers, xs, strict=True):
                w = params[c.name].reshape(c.rows, -1).mean(0)
                z = xm @ w
                target = bits[c.start : c.start + c.bits]
                reg_loss = reg_loss + F.binary_cross_entropy_with_logits(z, target, reduction="sum")
                correct &= bool(((z > 0).float() == target).all())
            if correct:
                break
            opt.zero_grad(set_to_none=True)
            (loss + 0.01 * reg_loss).backward()
            opt.step()
            step += 1
        else:
            continue
        break
    seconds = time.perf_counter() - t0
    inputs, labels = held_out
    figures = {
        "steps": step,
        "seconds": seconds,
        "samples": step * 64,
        "agreement": fidelity.agreement(model, master, inputs),
        "accuracy": fidelity.evaluate(model, inputs, labels),
        "all_bits_embedded": step < max_steps,
    }
    if keep_state:
        return figures, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return figures


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
        cfg = m.config["embed"]

    naive_seconds = float(np.mean([r["seconds"] for r in naive]))
    forward_equivalents = 3 * master_samples  # a training sample costs about one forward and a 2x backward
    per_buyer_forwards = cfg["moment_samples"] / args.buyers + 10_000
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
            "per_buyer_training_samples": cfg["steps"] * cfg["batch_size"],
            "per_buyer_forward_samples": per_buyer_forwards,
            "compute_fraction_of_master": (3 * cfg["steps"] * cfg["batch_size"] + per_buyer_forwards)
            / forward_equivalents,
            "compute_fraction_without_fidelity_check": (
                3 * cfg["steps"] * cfg["batch_size"] + cfg["moment_samples"] / args.buyers
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["wmtrace"], indent=1))
    print(json.dumps({"speedup": result["speedup"], "naive_s": naive_seconds, "master_s": master_seconds}))


if __name__ == "__main__":
    main()
