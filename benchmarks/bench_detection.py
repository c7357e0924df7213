"""Can an attacker tell which layers carry a mark? Carrier-layer statistics of buyer copies against
copies of the master fine-tuned exactly the same way without a mark.

    OMP_NUM_THREADS=1 python benchmarks/bench_detection.py [--registry DIR] [--copies 4]

Wang & Kerschbaum showed that Uchida et al.'s embedding raises the variance of the marked weights.
Marked copy: what `wmtrace issue` makes (closed-form placement + distillation repair under the hinge
regularizer). Unmarked twin: the same distillation repair, same batches, no placement and no
regularizer. For each carrier layer we compare what an attacker can compute without the master: the
weights' std and excess kurtosis, the spread (std) of the per-filter means, and the RMS of Uchida's
statistic (mean over filters). Writes benchmarks/results/detection.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from wmtrace import api, carriers, codes, embed


def stats(w: torch.Tensor) -> dict[str, float]:
    a = w.detach().double().flatten()
    z = (a - a.mean()) / a.std()
    rows = w.detach().double().reshape(w.shape[0], -1)
    return {
        "std": float(a.std()),
        "kurtosis": float((z**4).mean() - 3.0),
        "filter_mean_spread": float(rows.mean(1).std()),
        "statistic_rms": float(rows.mean(0).pow(2).mean().sqrt()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detection.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        m = api.ensure_example(reg)
        key = reg.key(m.name)
        master = api.build_model(m)
        state0 = {k: v.clone() for k, v in master.state_dict().items()}
        cfg = embed.EmbedConfig(**m.config["embed"])
        cs = [carriers.Carrier.from_dict(d) for d in m.config["carriers"]]
        margins = [d["margin"] for d in m.config["carriers"]]
        xs = [c.projection(key) for c in cs]
        spec = codes.CodeSpec(**m.config["code"])
        train = api._dataset(m.data, "train")
        groups: dict[str, list[dict]] = {"marked": [], "unmarked": []}
        for i in range(args.copies):
            bits = codes.codeword(key, m.name, 10_000 + i, spec)
            for group in groups:
                state = {k: v.clone() for k, v in state0.items()}
                if group == "marked":
                    embed.place(state, cs, xs, margins, bits)
                model = api.import_object(m.factory)()
                model.load_state_dict(state)
                c = cfg if group == "marked" else replace(cfg, lam=0.0)
                embed.repair(model, master, api._batches(train, c.batch_size, seed=i), cs, xs, margins, bits, c)
                params = dict(model.named_parameters())
                groups[group].append({cr.name: stats(params[cr.name]) for cr in cs})
        master_stats = {cr.name: stats(state0[cr.name]) for cr in cs}
    summary = {}
    for cr in cs:
        for k in master_stats[cr.name]:
            mk = np.array([g[cr.name][k] for g in groups["marked"]])
            un = np.array([g[cr.name][k] for g in groups["unmarked"]])
            spread = float(un.std(ddof=1)) if len(un) > 1 else float("nan")
            summary[f"{cr.name}/{k}"] = {
                "master": master_stats[cr.name][k],
                "unmarked_mean": float(un.mean()), "unmarked_std": spread,
                "marked_mean": float(mk.mean()), "marked_std": float(mk.std(ddof=1)) if len(mk) > 1 else float("nan"),
                "relative_change": float((mk.mean() - un.mean()) / abs(un.mean())),
                "z": float((mk.mean() - un.mean()) / spread) if spread > 0 else float("inf"),
            }
            s = summary[f"{cr.name}/{k}"]
            print(f"{cr.name:20s} {k:18s} unmarked {s['unmarked_mean']:.5g} +- {s['unmarked_std']:.2g}  "
                  f"marked {s['marked_mean']:.5g} +- {s['marked_std']:.2g}  "
                  f"change {s['relative_change']:+.2%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"copies": args.copies, "seconds": round(time.time() - t0, 1),
                                    "date": time.strftime("%Y-%m-%d"), "stats": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
