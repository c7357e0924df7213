"""Can an attacker who holds only a buyer copy tell which layers carry the mark?

    OMP_NUM_THREADS=1 python benchmarks/bench_detection.py [--registry DIR] [--copies 3] [--epochs 1 --lr 0.01]

Wang & Kerschbaum showed that Uchida et al.'s embedding raises the variance of the marked weights. Copies
are what `wmtrace issue` makes by default (closed-form placement, no training). For every conv layer we
compute statistics that need no master, only the weights and, for the last two, the attacker's own
training images run through the copy:

- `std`, `kurtosis` (excess): the weight distribution;
- `filter_mean_spread`: std over filters of each filter's mean weight;
- `mean_rms_rel`: RMS of the mean over filters (Uchida's statistic) over the RMS of the weights;
- `coherence`: `mean_rms_rel * sqrt(filters)`, about 1 when filters are independent and zero-mean;
- `low_share`: share of the filter mean's energy in the half of the layer's input directions that the
  data visits least (eigenvectors of the input second moments on 1,024 training images);
- `low_coherence`: `coherence` within that half: filters x |P mean|^2 / mean over filters of |P w_i|^2;
- `low_energy`: share of all the filters' energy in that half (a mark of any shape placed there adds to it);
- `low_spike`: the largest squared singular value of the filters within that half over the mean one (a
  rank-one mark, such as a shared shift or a single keyed sign pattern, stands out here).

Compared: (a) the master against buyer copies as issued; (b) the master and the copies each fine-tuned
the same way (same seed, same batches); and, with no reference at all, the carrier layers against the
other conv layers of the same copy (`ranking`: whether the layers with the highest statistic are exactly
the carriers). `--settings` instead places copies with other statistics, placements and strengths (no
training) and reports the same ranking, their agreement with the master, and the bit errors left after
`attacks.project` (filter mean, and whole filters). Writes benchmarks/results/detection.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from wmtrace import api, attacks, example, fidelity
from wmtrace.coding import codes
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.registry import Master  # noqa: E402
from wmtrace.schemes.whitebox import (
    Config,  # noqa: E402
    embed,
)
from wmtrace.schemes.whitebox import carriers as carriers_mod
from wmtrace.schemes.whitebox.carriers import Carrier

State = dict[str, torch.Tensor]
# (statistic, placement, strength) for --settings; the default is signed, activation-aware, 0.2.
PROJECT = (("mean", 0.5), ("mean", 0.75), ("filters", 0.5))  # removal attacks for --settings
SETTINGS = [("signed", "activation", 0.2), ("signed", "activation", 0.3), ("signed", "minimal-norm", 0.2),
            ("mean", "activation", 0.2), ("mean", "minimal-norm", 0.2)]


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """What the weights alone show."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    a = rows.flatten()
    z = (a - a.mean()) / a.std()
    rel = float(rows.mean(0).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
    return {
        "std": float(a.std()),
        "kurtosis": float((z**4).mean() - 3.0),
        "filter_mean_spread": float(rows.mean(1).std()),
        "mean_rms_rel": rel,
        "coherence": rel * math.sqrt(rows.shape[0]),
    }


def data_stats(w: torch.Tensor, moments: np.ndarray) -> dict[str, float]:
    """Where the filter mean lies among the layer's input directions, least visited half first."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    _, vecs = np.linalg.eigh(moments)
    low = torch.from_numpy(vecs[:, : vecs.shape[1] // 2])
    mean_low = (rows.mean(0) @ low).pow(2).sum()
    sv = torch.linalg.svdvals(rows @ low).pow(2)
    return {
        "low_share": float(mean_low / rows.mean(0).pow(2).sum()),
        "low_coherence": float(rows.shape[0] * mean_low / (rows @ low).pow(2).sum(1).mean()),
        "low_energy": float((rows @ low).pow(2).sum() / rows.pow(2).sum()),
        "low_spike": float(sv[0] / sv.mean()),
    }


def layer_stats(state: State, inputs: torch.Tensor) -> dict[str, dict[str, float]]:
    """Every statistic for every conv layer of one model."""
    convs = [k for k, v in state.items() if v.is_floating_point() and v.dim() == 4]
    model = example.build()
    model.load_state_dict(state)
    found = embed.input_moments(model, [Carrier(n, tuple(state[n].shape), 0, 0) for n in convs], inputs, 0.0)
    return {n: {**weight_stats(state[n]), **data_stats(state[n], mt)} for n, mt in zip(convs, found, strict=True)}


def compare(master: dict, copies: list[dict]) -> dict:
    """Per layer and statistic: master, copies' mean and spread, relative change."""
    out: dict = {}
    for layer, stats in master.items():
        for k, ref in stats.items():
            vals = np.array([c[layer][k] for c in copies])
            out[f"{layer}/{k}"] = {
                "master": ref, "copies_mean": float(vals.mean()),
                "copies_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                "relative_change": float((vals.mean() - ref) / abs(ref)),
            }
    return out


def ranking(copies: list[dict], carriers: list[str]) -> dict:
    """With no reference: per statistic, in how many copies the layers scoring highest are exactly the
    carriers, and the carriers' lowest value over the other layers' highest (> 1: they stand out)."""
    out = {}
    for k in ("mean_rms_rel", "coherence", "low_share", "low_coherence", "low_energy", "low_spike", "std"):
        hits, ratios = 0, []
        for c in copies:
            order = sorted(c, key=lambda n: c[n][k], reverse=True)
            hits += set(order[: len(carriers)]) == set(carriers)
            ratios.append(min(c[n][k] for n in carriers) / max(c[n][k] for n in c if n not in carriers))
        out[k] = {"carriers_on_top": hits, "copies": len(copies), "ratio_min": float(min(ratios)),
                  "ratio_max": float(max(ratios))}
    return out


def carrier_names(m: Master) -> list[str]:
    return [c.name for c in Config.of(m).carriers]


def carriers_as(m: Master, statistic: str) -> list[Carrier]:
    """The master's carriers, reading bits from signed means or (Uchida et al.) the plain filter mean."""
    return [dataclasses.replace(c, signed=statistic == "signed") for c in Config.of(m).carriers]


def placed(m: Master, stored: dict[str, np.ndarray], key: bytes, master: State, n: int, statistic: str,
           placement: str, strength: float) -> list[tuple[State, np.ndarray]]:
    """`n` copies placed as `issue` would with another statistic, placement or strength (codewords of
    unissued IDs), each with its codeword bits; `stored`: the master's stored placement metric."""
    cs = carriers_as(m, statistic)
    xs = [c.secret(key) for c in cs]
    metrics = stored if placement == "activation" else {}
    maps = [carriers_mod.embedding_map(x, metrics.get(c.name)) for c, x in zip(cs, xs, strict=True)]
    margins = [embed.margin(master[c.name], c, strength) for c in cs]
    spec = m.config.code
    out = []
    for i in range(n):
        state = {k: v.clone() for k, v in master.items()}
        bits = codes.codeword(key, m.name, 10_000 + i, spec)
        embed.place(state, cs, xs, margins, bits, maps=maps)
        out.append((state, bits))
    return out


def bit_errors(cs: list[Carrier], key: bytes, master: State, state: State, bits: np.ndarray) -> float:
    """Share of codeword bits whose statistic of the difference to the master has the wrong sign."""
    wrong = 0
    for c in cs:
        delta = (state[c.name].double() - master[c.name].double()).reshape(c.rows, -1).numpy()
        soft = c.secret(key).read(delta)
        wrong += int(((soft > 0) != bits[c.start : c.start + c.bits].astype(bool)).sum())
    return wrong / len(bits)


def settings(m: Master, stored: dict[str, np.ndarray], key: bytes, master: State, n: int,
             inputs: torch.Tensor) -> dict:
    """(c) Would another placement or strength hide the carriers? Reference-free ranking, the copies'
    top-1 agreement with the master on 2,000 test images, and the bit error rate left after
    `attacks.project` (the removals this visibility enables) for each of PROJECT, per setting."""
    test = load_fashion_mnist("test", limit=2000)[0]
    ref = example.build()
    ref.load_state_dict(master)
    trainer = attacks.Trainer(example.build, example.dataset)
    out = {}
    for statistic, placement, strength in SETTINGS:
        pairs = placed(m, stored, key, master, n, statistic, placement, strength)
        cs = carriers_as(m, statistic)
        agree = []
        for st, _ in pairs:
            model = example.build()
            model.load_state_dict(st)
            agree.append(fidelity.agreement(model.eval(), ref.eval(), test))
        ber = {f"{part} {f}": [bit_errors(cs, key, master, attacks.project(st, f, trainer, part), bits)
                               for st, bits in pairs] for part, f in PROJECT}
        stats = [layer_stats(st, inputs) for st, _ in pairs]
        name = f"{statistic}/{placement}/{strength}"
        out[name] = {"ranking": ranking(stats, carrier_names(m)),
                     "agreement_mean": float(np.mean(agree)), "ber_after_project": ber}
        for k, r in out[name]["ranking"].items():
            print(f"(c) {name:28s} {k:14s} carriers on top in {r['carriers_on_top']}/{r['copies']}, "
                  f"carriers / best other layer {r['ratio_min']:.2f}-{r['ratio_max']:.2f}", flush=True)
        print(f"(c) {name:28s} agreement {np.mean(agree):.2%}; BER after project "
              + ", ".join(f"{f}: {min(v):.3f}-{max(v):.3f}" for f, v in ber.items()), flush=True)
    return out


def copies(reg, m, n: int, out: Path) -> list[State]:
    """`n` buyer copies issued with the defaults (fidelity not measured: not needed here)."""
    have = [b for b in reg.buyers(m.name) if b.status == "issued"]
    if len(have) < n:
        have += api.issue(reg, buyers=n - len(have), out=out, master=m.name, eval_samples=0)
    return [load_file(b.file) for b in have[:n]]


def show(title: str, table: dict) -> None:
    print(title)
    for key, s in table.items():
        print(f"  {key:34s} master {s['master']:.5g}  copies {s['copies_mean']:.5g} +- {s['copies_std']:.2g}  "
              f"change {s['relative_change']:+.1%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="registry with the example master (else a temporary one)")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning of master and copies in (b)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--samples", type=int, default=1024, help="training images for the input moments")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detection.json"))
    ap.add_argument("--settings", action="store_true",
                    help="only (c): copies placed with other placements and strengths, no fine-tuning")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    inputs = load_fashion_mnist("train", limit=args.samples)[0]
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        m = api.ensure_example(reg)
        carriers = carrier_names(m)
        master = load_file(str(m.weights))
        if args.settings:
            found = settings(m, reg.stored(m), reg.key(m.name), master, args.copies, inputs)
            result = {"copies": args.copies, "settings": found}
            result.update(date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0, 1))
            write_json(args.out, result, indent=1, newline=True)
            return
        issued = copies(reg, m, args.copies, Path(tmp) / "buyers")
    result: dict = {"copies": args.copies, "carriers": carriers, "finetune": {"epochs": args.epochs, "lr": args.lr}}
    as_issued = [layer_stats(s, inputs) for s in issued]
    result["issued"] = compare(layer_stats(master, inputs), as_issued)
    result["issued_ranking"] = ranking(as_issued, carriers)
    show("(a) master against copies as issued", result["issued"])
    trainer = attacks.Trainer(example.build, example.dataset, seed=0)  # same batches for every model
    tuned = [layer_stats(attacks.finetune(s, args.epochs, trainer, args.lr), inputs) for s in issued]
    result["finetuned"] = compare(layer_stats(attacks.finetune(master, args.epochs, trainer, args.lr), inputs), tuned)
    result["finetuned_ranking"] = ranking(tuned, carriers)
    show(f"(b) master and copies fine-tuned {args.epochs} epoch(s) at lr {args.lr}", result["finetuned"])
    for what in ("issued_ranking", "finetuned_ranking"):
        for k, r in result[what].items():
            print(f"{what:18s} {k:14s} carriers on top in {r['carriers_on_top']}/{r['copies']} copies, "
                  f"carriers / best other layer {r['ratio_min']:.2f}-{r['ratio_max']:.2f}")
    result.update(date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - t0, 1), torch=torch.__version__)
    write_json(args.out, result, indent=1, newline=True)


if __name__ == "__main__":
    main()
