"""Are fast-issued copies as robust as slowly issued ones? Same master, same attacks, side by side.

Slow = the paper's fine-tune-to-embed (_common.naive_buyer, as in bench_issue), extracted the paper's way (signs of
the secret projections of the raw filter mean) and decoded with the same Reed-Solomon decoder.
Fast = `wmtrace issue` with its defaults, traced with `wmtrace trace`'s pipeline. Attacks: global
magnitude pruning and plain fine-tuning on the task (`attacks.finetune`: SGD, Nesterov momentum, batch
64, BatchNorm in training mode, batches seeded by the buyer ID), as a leaker would run them.

    python benchmarks/bench_issue_robustness.py --buyers 2 --out benchmarks/results/issue_robustness.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import SoftBits, example_accuracy, example_master, naive_buyer, named, run_info, write_json  # noqa: E402

from wmtrace import api, attacks, example
from wmtrace.coding import accuse, codes
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.pipeline.trace import trace_tensors  # noqa: E402
from wmtrace.registry import Buyer  # noqa: E402
from wmtrace.schemes.whitebox import Config  # noqa: E402

PRUNE = [0.5, 0.65, 0.8, 0.9, 0.95]
FINETUNE = [(1, 0.01), (1, 0.05)]  # (epochs, learning rate); the master trained 2 epochs at up to 0.05


def outcome(soft: np.ndarray, bits: np.ndarray, named: set[int], true_id: int) -> dict:
    """`named`: buyers accused, by decoding or by score (a single leaker too weakly marked to decode)."""
    known = ~np.isnan(soft)
    errors = int(np.count_nonzero((soft[known] > 0) != bits[known].astype(bool)))
    return {
        "ber": errors / max(1, int(known.sum())),
        "identified": true_id in named,
        "wrong_buyer": bool(named - {true_id}),
    }


def judge_fast(reg, m, b: Buyer, state: dict, read: SoftBits, bits: np.ndarray) -> dict:
    tensors = {k: v.numpy() for k, v in state.items()}
    soft = read(tensors)
    r = trace_tensors(tensors, reg, master=m.name)
    return outcome(soft, bits, named(r), b.id)


def judge_naive(reg, m, buyer_id: int, ids: set[int], state: dict) -> dict:
    key = reg.key(m.name)
    spec = m.config.code
    soft = np.full(spec.bits, np.nan)
    for c in Config.of(m).carriers:
        w = state[c.name].reshape(c.rows, -1).double()
        soft[c.start : c.start + c.bits] = c.projection(key) @ w.mean(0).numpy()  # the paper's extraction

    def check(data: bytes) -> int | None:
        found = codes.verify(key, m.name, data)
        return found if found in ids else None

    decoded = codes.decode(soft, spec, check, len(ids))
    bits = codes.codeword(key, m.name, buyer_id, spec)
    order = sorted(ids)
    by_score = {order[a.index] for a in accuse.accuse(soft, codes.codewords(key, m.name, order, spec), spec, 1e-6)}
    return outcome(soft, bits, {decoded.buyer_id} if decoded else by_score, buyer_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buyers", type=int, default=2)
    ap.add_argument("--master", type=Path, help="an already trained example master (skips training)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/issue_robustness.json"))
    ap.add_argument("--only", choices=["prune", "finetune"], help="run one attack family")
    ap.add_argument("--fast-only", action="store_true", help="skip the slowly issued copies")
    args = ap.parse_args()

    train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")

    def accuracy(state: dict) -> float:
        return example_accuracy(state, x_test, y_test)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(Path(tmp) / "registry", create=True)
        m = example_master(reg, args.master)
        read = SoftBits(reg, m, metrics=False)
        key, spec = read.key, read.spec

        copies = []
        for b in api.issue(reg, buyers=args.buyers, out=Path(tmp) / "out"):
            copies.append(("fast", b.id, load_file(b.file)))
        naive_ids = {10_000 + i for i in range(args.buyers)}
        for bid in sorted(naive_ids) if not args.fast_only else []:
            stats, state = naive_buyer(reg, m, bid, train, (x_test, y_test), 0.01, 4000, keep_state=True)
            copies.append(("slow", bid, state))

        def judge(kind: str, bid: int, state: dict) -> dict:
            if kind == "fast":
                b = next(b for b in reg.buyers(m.name) if b.id == bid)
                return judge_fast(reg, m, b, state, read, codes.codeword(key, m.name, bid, spec))
            return judge_naive(reg, m, bid, naive_ids, state)

        for kind, bid, state in copies:
            base = {"issuing": kind, "buyer": bid}
            rows.append({**base, "attack": "none", "strength": 0, "accuracy": accuracy(state),
                         **judge(kind, bid, state)})
            for amount in PRUNE if args.only != "finetune" else []:
                attacked = attacks.prune_global(state, amount)
                rows.append({**base, "attack": "prune", "strength": amount, "accuracy": accuracy(attacked),
                             **judge(kind, bid, attacked)})
            for epochs, lr in FINETUNE if args.only != "prune" else []:
                trainer = attacks.Trainer(example.build, example.dataset, seed=bid)
                attacked = attacks.finetune(state, epochs, trainer, lr)
                rows.append({**base, "attack": f"finetune {epochs} epoch", "strength": lr,
                             "accuracy": accuracy(attacked), **judge(kind, bid, attacked)})
            print(json.dumps(rows[-1]), flush=True)

    result = {**run_info(), "rows": rows}
    write_json(args.out, result)
    for r in rows:
        print(f"{r['issuing']:5s} {r['buyer']:6d} {r['attack']:18s} {r['strength']:<5} acc {r['accuracy']:.4f} "
              f"BER {r['ber']:.3f} identified {r['identified']} wrong {r['wrong_buyer']}")


if __name__ == "__main__":
    main()
