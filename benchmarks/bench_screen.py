"""The screen before the full match (`wmtrace.schemes.whitebox.screen`): how often it rejects the true
carrier, and what it saves, against `align.locate` as it was before the screen.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_screen.py --out benchmarks/results/screen.json

Two sets of copies, each traced by the current `align.locate` and by the one of commit `BEFORE` (loaded
from git, so both run side by side in one process, on the same arrays):

- the example CNN (two 3x3 conv carriers): each issued buyer's copy under the attacks of
  `attack_list` (wmtrace.attacks: pruning, quantization, noise, permutation with and without dummy
  channels, structured pruning, fine-tuning, a combination). Each copy is located under its own
  names, with every tensor renamed in a shuffled order, and renamed after `--decoys` random tensors
  of each carrier's shape;
- a random 256 x 2,048 Linear carrier (the 1.1B benchmark's k_proj shape, bench_stream.py) under
  quantization, noise, pruning, rescaling, dummy filters and permutations of filters and input
  channels, with random decoys: the screen's rank and the full match of the copy (a decoy's full
  match costs 2-3 s here).

A false reject is the true carrier ranked below `screen.MARGIN` although `_match` finds it (score at
least `align.MATCH_THRESHOLD`): it costs time (the full match of the candidates ranked above it), not
the carrier, since rejected candidates are still matched while nothing matches clearly (unless
`align.MAX_CANDIDATES` others outrank it, as before the screen).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import example_buyers, run_info, write_json  # noqa: E402

from wmtrace import api, attacks, example  # noqa: E402
from wmtrace.attacks.quantize import dequantize, quantize  # noqa: E402
from wmtrace.schemes.whitebox import Config, align, screen  # noqa: E402
from wmtrace.schemes.whitebox.extract import master_arrays  # noqa: E402

BEFORE = "84c27cf"  # the last commit whose align.locate has no screen
ROOT = Path(__file__).resolve().parent.parent
State = dict[str, torch.Tensor]
VARIANTS = ("named", "renamed", "renamed_decoys")


def before_align() -> types.ModuleType:
    """`align` as of commit BEFORE, imported beside the current one."""
    src = subprocess.run(["git", "show", f"{BEFORE}:wmtrace/schemes/whitebox/align.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("wmtrace.schemes.whitebox.align_before")
    mod.__package__ = "wmtrace.schemes.whitebox"
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"align@{BEFORE}", "exec"), mod.__dict__)
    return mod


def attack_list(trainer: attacks.Trainer, finetune: bool) -> dict[str, Callable[[State], State]]:
    """The attacks each buyer's copy goes through; int8 copies are dequantized as `formats` would."""
    out: dict[str, Callable[[State], State]] = {
        "none": lambda s: s,
        "prune 50%": lambda s: attacks.prune(s, 0.5),
        "prune 80%": lambda s: attacks.prune(s, 0.8),
        "prune 90%": lambda s: attacks.prune(s, 0.9),
        "prune 95%": lambda s: attacks.prune(s, 0.95),
        "prune 98%": lambda s: attacks.prune(s, 0.98),
        "prune 80% per layer": lambda s: attacks.prune(s, 0.8, "layer"),
        "int8 per tensor": lambda s: dequantize(quantize(s, "int8")),
        "int8 per channel": lambda s: dequantize(quantize(s, "int8-channel")),
        "fp16": lambda s: quantize(s, "fp16"),
        "noise 0.2": lambda s: attacks.noise(s, 0.2),
        "noise 0.4": lambda s: attacks.noise(s, 0.4),
        "noise 0.8": lambda s: attacks.noise(s, 0.8),
        "permute, rescale": lambda s: attacks.permute(s, 0.0, seed=3),
        "permute, rescale, 1x dummies": lambda s: attacks.permute(s, 1.0, seed=3),
        "prune-filters 25%": lambda s: attacks.prune_filters(s, 0.25),
        "prune-filters 50%": lambda s: attacks.prune_filters(s, 0.5),
        "permute + prune 50% + int8": lambda s: dequantize(quantize(attacks.prune(
            attacks.permute(s, 0.5, seed=4), 0.5), "int8-channel")),
    }
    if finetune:
        out["finetune 0.25 epoch, lr 0.05"] = lambda s: attacks.finetune(s, 0.25, trainer, lr=0.05)
        out["finetune 1 epoch, lr 0.05"] = lambda s: attacks.finetune(s, 1.0, trainer, lr=0.05)
    return out


def timed_locate(mod: types.ModuleType, tensors: dict, arrays: dict, carriers: list, repeat: int) -> dict:
    """Best time of `repeat` locates, the full matches one locate made, and where each carrier was found."""
    calls: list[int] = []
    real = mod._match
    mod._match = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        best = float("inf")
        for _ in range(repeat):
            calls.clear()
            t0 = time.perf_counter()
            found = mod.locate(tensors, arrays, carriers)
            best = min(best, time.perf_counter() - t0)
    finally:
        mod._match = real
    return {"seconds": round(best, 4), "matches": len(calls),
            "found": [None if f is None else [f.source, round(f.similarity, 4), f.by_name] for f in found]}


def screen_row(tensors: dict, truth: dict[str, str], arrays: dict, carriers: list) -> list[dict]:
    """Per carrier: the true tensor's rank and full-match score; the best rank and the best full-match
    score of any other candidate (decoys, other layers); how many others pass the screen."""
    rows = []
    for c in carriers:
        ref = arrays[c.name].astype(np.float64).reshape(c.shape[0], c.shape[1], -1)
        sk = screen.sketch(ref)
        ranks: dict[str, float] = {}
        matches: dict[str, float] = {}
        for name, t in tensors.items():
            for view in align._views(align._finite(t), c):
                ranks[name] = max(ranks.get(name, -1.0), screen.rank(view, sk))
                matches[name] = max(matches.get(name, 0.0), align._match(view, ref)[2])
        true = truth[c.name]
        others = [n for n in ranks if n != true]
        rows.append({"carrier": c.name, "true_rank": round(ranks[true], 3), "true_match": round(matches[true], 3),
                     "false_reject": bool(ranks[true] < screen.MARGIN and matches[true] >= align.MATCH_THRESHOLD),
                     "true_ranked_first": all(ranks[true] > ranks[n] for n in others),
                     "best_other_rank": round(max(ranks[n] for n in others), 3) if others else None,
                     "best_other_match": round(max(matches[n] for n in others), 3) if others else None,
                     "others_passing": int(sum(ranks[n] >= screen.MARGIN for n in others)), "others": len(others)})
    return rows


def renamed(state: dict[str, np.ndarray], carriers: list, decoys: int, seed: int):
    """Every tensor renamed (t000, t001, ... in a shuffled order), after `decoys` random tensors per
    carrier shape; and where each carrier went."""
    rng = np.random.default_rng(seed)
    names = list(state)
    order = rng.permutation(len(names))
    new = {names[j]: f"t{i:03d}" for i, j in enumerate(order)}
    out: dict[str, np.ndarray] = {}
    for c in carriers:
        std = float(np.std(state[c.name])) if c.name in state else 0.05
        for i in range(decoys):
            out[f"decoy.{c.name}.{i}"] = (rng.standard_normal(c.shape) * std).astype(np.float32)
    out |= {new[k]: state[k] for k in (names[j] for j in order)}
    return out, {c.name: new[c.name] for c in carriers}


def cnn(args: argparse.Namespace, old: types.ModuleType) -> dict:
    reg = api.open_registry(args.dir / "registry", create=True)
    if args.trained is not None:
        from _common import example_master

        example_master(reg, trained=args.trained)
    m, buyers = example_buyers(reg, args.dir / "out", count=args.buyers)
    carriers = list(Config.from_dict(m.config.schemes["whitebox"]).carriers)
    arrays = master_arrays(m, [c.name for c in carriers])
    trainer = attacks.Trainer(example.build, example.dataset, seed=0)

    cases = []
    for b in buyers[: args.buyers]:
        base = load_file(b.file)
        for label, attack in attack_list(trainer, args.finetune).items():
            state = {k: v.float().numpy() for k, v in attack(dict(base)).items() if v.is_floating_point()}
            plain, truth = renamed(state, carriers, 0, seed=b.id)
            among, _ = renamed(state, carriers, args.decoys, seed=b.id)
            row = {"buyer": b.id, "attack": label, "truth": truth}
            for which, tensors in (("named", state), ("renamed", plain), ("renamed_decoys", among)):
                row[which] = {"before": timed_locate(old, tensors, arrays, carriers, args.repeat),
                              "after": timed_locate(align, tensors, arrays, carriers, args.repeat)}
            row["screen"] = screen_row(among, truth, arrays, carriers)
            cases.append(row)
            print(label, b.id, {k: (row[k]["before"]["seconds"], row[k]["after"]["seconds"], row[k]["after"]["matches"])
                                for k in VARIANTS},
                  [(s["true_rank"], s["true_match"], s["best_other_rank"], s["best_other_match"])
                   for s in row["screen"]], flush=True)
    reg.close()
    return {"carriers": [c.name for c in carriers], "decoys_per_carrier": args.decoys, "cases": cases}


def linear_cases(rng: np.random.Generator, w: np.ndarray) -> dict[str, np.ndarray]:
    """A 256 x 2,048 carrier under what a leaker may do to a Linear layer's weights."""
    r, c = w.shape
    std = w.std()

    def int8(a: np.ndarray, per_row: bool) -> np.ndarray:
        s = np.abs(a).max(1, keepdims=True) / 127 if per_row else np.abs(a).max() / 127
        return np.round(a / s) * s

    def prune(a: np.ndarray, f: float) -> np.ndarray:
        return np.where(np.abs(a) <= np.quantile(np.abs(a), f), 0.0, a)

    base = {
        "copy": w, "int8 per row": int8(w, True), "int8 per tensor": int8(w, False),
        "noise 0.2": w + rng.standard_normal(w.shape) * 0.2 * std,
        "noise 0.5": w + rng.standard_normal(w.shape) * 0.5 * std,
        "noise 1.0": w + rng.standard_normal(w.shape) * std,
        "prune 50%": prune(w, 0.5), "prune 80%": prune(w, 0.8), "prune 90%": prune(w, 0.9),
        "filters rescaled": w * np.exp(rng.uniform(-0.7, 0.7, (r, 1))),
        "input channels rescaled": w * np.exp(rng.uniform(-0.7, 0.7, (1, c))),
        "50% dummy filters": np.vstack([w, rng.standard_normal((r // 2, c)) * std]),
        "25% filters removed": w[: 3 * r // 4],
    }
    out = dict(base)
    for k, v in base.items():
        out[f"{k}, filters permuted"] = v[rng.permutation(len(v))]
        out[f"{k}, filters and inputs permuted"] = v[rng.permutation(len(v))][:, rng.permutation(c)]
    return out


def linear(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(11)
    w = rng.standard_normal((256, 2048)) * 0.02
    ref = w[:, :, None]
    sk = screen.sketch(ref)
    decoys = [screen.rank((rng.standard_normal(w.shape) * 0.02)[:, :, None], sk) for _ in range(args.linear_decoys)]
    rows = []
    for label, a in linear_cases(rng, w).items():
        t = a[:, :, None]
        t0 = time.perf_counter()
        r = screen.rank(t, sk)
        screen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        matched = align._match(t, ref)[2]
        rows.append({"case": label, "rank": round(r, 3), "match": round(matched, 3),
                     "false_reject": bool(r < screen.MARGIN and matched >= align.MATCH_THRESHOLD),
                     "screen_seconds": round(screen_s, 4), "match_seconds": round(time.perf_counter() - t0, 3)})
        print(rows[-1], flush=True)
    return {"shape": list(w.shape), "decoys": len(decoys), "decoy_rank_max": round(max(decoys), 4),
            "decoy_rank_mean": round(float(np.mean(decoys)), 4), "decoys_passing": int(sum(d >= screen.MARGIN
                                                                                         for d in decoys)),
            "cases": rows}


def summary(cnn_part: dict | None, lin: dict | None) -> dict:
    out: dict = {"margin": screen.MARGIN, "match_threshold": align.MATCH_THRESHOLD}
    if cnn_part:
        cases = cnn_part["cases"]
        scr = [s for c in cases for s in c["screen"]]
        findable = [s for s in scr if s["true_match"] >= align.MATCH_THRESHOLD]
        out["cnn"] = {
            "copies": len(cases), "carrier_instances": len(scr), "findable": len(findable),
            "false_rejects": sum(s["false_reject"] for s in scr),
            "true_ranked_first": sum(s["true_ranked_first"] for s in scr),
            "decoys_and_other_layers_passing": sum(s["others_passing"] for s in scr),
            "decoys_and_other_layers": sum(s["others"] for s in scr),
            "best_other_match": max(s["best_other_match"] for s in scr),
            "same_tensor_as_before": sum(all(c[v]["before"]["found"] == c[v]["after"]["found"] for v in VARIANTS)
                                         for c in cases),
            "found_the_truth_renamed": sum(all(f and f[0] == c["truth"][n] for f, n in
                                               zip(c[v]["after"]["found"], c["truth"], strict=True))
                                           for c in cases for v in VARIANTS[1:]),
        }
        o = out["cnn"]
        for which in VARIANTS:
            for when in ("before", "after"):
                o[f"{which}_{when}_seconds_total"] = round(sum(c[which][when]["seconds"] for c in cases), 3)
                o[f"{which}_{when}_matches_total"] = sum(c[which][when]["matches"] for c in cases)
        for when in ("before", "after"):
            o[f"renamed_over_named_{when}"] = round(o[f"renamed_{when}_seconds_total"]
                                                    / o[f"named_{when}_seconds_total"], 2)
            ratios = [c["renamed"][when]["seconds"] / c["named"][when]["seconds"] for c in cases]
            o[f"renamed_over_named_{when}_worst_copy"] = round(max(ratios), 2)
    if lin:
        findable = [r for r in lin["cases"] if r["match"] >= align.MATCH_THRESHOLD]
        out["linear"] = {"cases": len(lin["cases"]), "findable": len(findable),
                         "false_rejects": sum(r["false_reject"] for r in lin["cases"]),
                         "false_reject_cases": [r["case"] for r in lin["cases"] if r["false_reject"]],
                         "decoys_passing": lin["decoys_passing"], "decoys": lin["decoys"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/screen.json"))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wmtrace-bench-screen"),
                    help="registry with the example master and its buyers (made if missing)")
    ap.add_argument("--trained", type=Path, help="an already trained example master (safetensors) to register")
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--decoys", type=int, default=20, help="random tensors of each carrier's shape in a renamed copy")
    ap.add_argument("--linear-decoys", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="locates per timing (the best is kept)")
    ap.add_argument("--no-finetune", dest="finetune", action="store_false")
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--skip-linear", action="store_true")
    args = ap.parse_args()
    old = before_align()
    cnn_part = None if args.skip_cnn else cnn(args, old)
    lin = None if args.skip_linear else linear(args)
    report = {**run_info(), "before": BEFORE, "summary": summary(cnn_part, lin), "cnn": cnn_part, "linear": lin}
    write_json(args.out, report, newline=True)
    print(report["summary"])


if __name__ == "__main__":
    main()
