"""Are fast-issued copies as robust as slowly issued ones? Same master, same attacks, side by side.

Slow = the paper's fine-tune-to-embed (bench_issue.naive_buyer), extracted the paper's way (signs of
the secret projections of the raw filter mean) and decoded with the same Reed-Solomon decoder.
Fast = `wmtrace issue` with its defaults, traced with `wmtrace trace`'s pipeline. Attacks: global
magnitude pruning and plain fine-tuning on the task (SGD, Nesterov momentum, batch 64, BatchNorm in
training mode), as a leaker would run them.

    python benchmarks/bench_issue_robustness.py --buyers 2 --out benchmarks/results/issue_robustness.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_issue import naive_buyer  # noqa: E402

from wmtrace import accuse, api, attacks, codes, example, fidelity  # noqa: E402
from wmtrace.align import locate  # noqa: E402
from wmtrace.carriers import Carrier  # noqa: E402
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.registry import Buyer  # noqa: E402
from wmtrace.trace import extract, master_arrays, trace_tensors  # noqa: E402

PRUNE = [0.5, 0.65, 0.8, 0.9, 0.95]
FINETUNE = [(1, 0.01), (1, 0.05)]  # (epochs, learning rate); the master trained 2 epochs at up to 0.05


def finetune(state: dict, train, epochs: int, lr: float, seed: int) -> dict:
    model = example.build()
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            j = perm[i : i + 64]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def outcome(soft: np.ndarray, bits: np.ndarray, named: set[int], true_id: int) -> dict:
    """`named`: buyers accused, by decoding or by score (a single leaker too weakly marked to decode)."""
    known = ~np.isnan(soft)
    errors = int(np.count_nonzero((soft[known] > 0) != bits[known].astype(bool)))
    return {
        "ber": errors / max(1, int(known.sum())),
        "identified": true_id in named,
        "wrong_buyer": bool(named - {true_id}),
    }


def judge_fast(reg, m, b: Buyer, state: dict, arrays: dict, bits: np.ndarray) -> dict:
    tensors = {k: v.numpy() for k, v in state.items()}
    carriers = [Carrier.from_dict(d) for d in m.config["carriers"]]
    soft = extract(locate(tensors, arrays, carriers), arrays, reg.key(m.name), m.config)
    r = trace_tensors(tensors, reg, master=m.name)
    named = {r.buyer["id"]} if r.buyer else {c["id"] for c in r.colluders}
    return outcome(soft, bits, named, b.id)


def judge_naive(reg, m, buyer_id: int, ids: set[int], state: dict) -> dict:
    key = reg.key(m.name)
    spec = codes.CodeSpec(**m.config["code"])
    soft = np.full(spec.bits, np.nan)
    for d in m.config["carriers"]:
        c = Carrier.from_dict(d)
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
        model = example.build()
        model.load_state_dict(state)
        return fidelity.evaluate(model, x_test, y_test)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(Path(tmp) / "registry", create=True)
        if args.master:
            cached = reg.cache_path(f"{api.EXAMPLE_MASTER}.safetensors")
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.master, cached)
        m = api.ensure_example(reg)
        arrays = master_arrays(m)
        key = reg.key(m.name)
        spec = codes.CodeSpec(**m.config["code"])

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
                return judge_fast(reg, m, b, state, arrays, codes.codeword(key, m.name, bid, spec))
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
                attacked = finetune(state, train, epochs, lr, seed=bid)
                rows.append({**base, "attack": f"finetune {epochs} epoch", "strength": lr,
                             "accuracy": accuracy(attacked), **judge(kind, bid, attacked)})
            print(json.dumps(rows[-1]), flush=True)

    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['issuing']:5s} {r['buyer']:6d} {r['attack']:18s} {r['strength']:<5} acc {r['accuracy']:.4f} "
              f"BER {r['ber']:.3f} identified {r['identified']} wrong {r['wrong_buyer']}")


if __name__ == "__main__":
    main()
