"""Naming one of 50 buyers from answers alone: queries needed, bound, fidelity and issuing cost.

The example master (both schemes) issues `--buyers` copies; each copy is queried as a black box
(run by torch, weights never read by the tracer) answering top-1 labels only, top-3 with probabilities
rounded to 2 decimals, and full scores. Innocents: the master itself, an independently trained model
(same architecture, other seed), and every copy, which must never be named as another buyer. Issuing
cost: the black-box mark's share of issuing (its closed-form edit), beside the master's training time
measured on the same machine.

    python benchmarks/bench_blackbox_buyers.py --trained fashion-cnn.safetensors --buyers 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import run_info, write_json

from wmtrace import api, example, modelio
from wmtrace.coding import codes
from wmtrace.pipeline.query import query_target
from wmtrace.schemes import blackbox
from wmtrace.targets import open_target

FACTORY = "wmtrace.example:build"
REVEALS = (("top1", None), ("topk", 2), ("scores", None))


def ask(reg, path: Path, reveal: str, decimals: int | None):
    with open_target(str(path), reveal=reveal, factory=FACTORY, k=3, decimals=decimals) as t:
        return query_target(t, reg, "fashion")


def embed_seconds(reg, m) -> float:
    """Seconds of the black-box edit for one copy (the mark's own cost; the self-checks and fidelity
    figures are the rest of issuing), best of 5."""
    from wmtrace import schemes

    model, _ = modelio.build(m)
    master = schemes.MasterModel(model, dict(model.state_dict()), None, None)
    marker = schemes.get(blackbox.NAME).issuer(master, m, m.config.schemes[blackbox.NAME], reg.key(m.name),
                                               reg.stored(m))
    bits = codes.codeword(reg.key(m.name), m.name, 1, m.config.code)
    best = float("inf")
    for _ in range(5):
        copy = modelio.import_object(FACTORY)()
        copy.load_state_dict(model.state_dict())
        t0 = time.perf_counter()
        marker.embed(copy, bits, 0, None)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", type=Path, required=True, help="the trained example master (.safetensors)")
    p.add_argument("--work", type=Path, default=Path("/tmp/wmtrace-bench-bb-buyers"))
    p.add_argument("--buyers", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/blackbox_buyers.json"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reg = api.open_registry(args.work / "registry", create=True)
    m = next((x for x in reg.masters() if x.name == "fashion"), None)
    t0 = time.perf_counter()
    m = m or api.init(reg, "fashion", args.trained, FACTORY, data="wmtrace.example:dataset")
    init_seconds = time.perf_counter() - t0
    have = [b for b in reg.buyers(m.name) if b.status == "issued"]
    t0 = time.perf_counter()
    if len(have) < args.buyers:
        api.issue(reg, buyers=args.buyers - len(have), out=args.work / "copies", master=m.name)
    issue_seconds = (time.perf_counter() - t0) / max(1, args.buyers - len(have))
    buyers = [b for b in reg.buyers(m.name) if b.status == "issued"][: args.buyers]
    other = args.work / "independent.safetensors"
    if not other.exists():
        example.train_master(other, epochs=2, seed=1)
    training = example.train_master(args.work / "timing.safetensors", epochs=2, seed=0)["seconds"]
    rows = []
    for b in buyers:
        for reveal, decimals in REVEALS:
            r = ask(reg, Path(b.file), reveal, decimals)
            accused = ([r.buyer["id"]] if r.buyer else []) + [c["id"] for c in r.colluders]
            rows.append({"buyer": b.id, "reveal": reveal, "named": b.id in accused,
                         "wrong": any(i != b.id for i in accused), "queries": r.queries,
                         "bound": r.false_positive_probability})
        print(rows[-3:], flush=True)
    innocents = []
    for label, path in (("master", m.weights), ("independent", other)):
        for reveal, decimals in REVEALS:
            r = ask(reg, Path(path), reveal, decimals)
            innocents.append({"model": label, "reveal": reveal, "verdict": r.verdict, "queries": r.queries,
                              "accused": ([r.buyer["id"]] if r.buyer else []) + [c["id"] for c in r.colluders]})
    summary = summarize(rows, buyers, m)
    summary |= {"init_seconds": round(init_seconds, 1), "issue_seconds_per_buyer": round(issue_seconds, 1),
                "blackbox_embed_seconds": round(embed_seconds(reg, m), 3),
                "master_training_seconds": round(training, 1)}
    summary["blackbox_embed_share_of_training"] = summary["blackbox_embed_seconds"] / summary["master_training_seconds"]
    print(summary, innocents, sep="\n")
    write_json(args.out, {"run": run_info(), "summary": summary, "innocents": innocents, "rows": rows})


def summarize(rows: list[dict], buyers, m) -> dict:
    out = {"buyers": len(buyers), "master_accuracy": m.accuracy}
    for reveal, _ in REVEALS:
        sel = [r for r in rows if r["reveal"] == reveal]
        q = np.array([r["queries"] for r in sel if r["named"]])
        out[reveal] = {"named": sum(r["named"] for r in sel), "wrong": sum(r["wrong"] for r in sel),
                       "queries_median": float(np.median(q)) if len(q) else None,
                       "queries_max": int(q.max()) if len(q) else None,
                       "bound_max": max((r["bound"] for r in sel if r["named"]), default=None)}
    agree = np.array([b.agreement for b in buyers])
    acc = np.array([b.accuracy for b in buyers])
    out["fidelity"] = {"agreement_min": float(agree.min()), "agreement_mean": float(agree.mean()),
                       "accuracy_min": float(acc.min()), "accuracy_mean": float(acc.mean())}
    return out


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
