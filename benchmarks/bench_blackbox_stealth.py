"""Can a leaker tell our queries from ordinary inputs? AUROC of simple detectors, queries vs test images.

Query sets (positives): design A's 256 boundary queries and its 2,048 natural queries (both as the
library plans them), design B's 256 keyed noise triggers (bench_blackbox_designs.py), and, as a
pointer for future work, the 256 training images with the smallest master margin (top-1 minus top-2
logit) among 20,000: natural inputs that are as close to a boundary as nature offers. Negatives: 2,000
ordinary test images. Each set is answered by the copy that would be served: an A copy for A's sets
and the smallest-margin images, a B copy for B's triggers.

Detectors (higher = more suspicious; AUROC 0.5 = blind, 1.0 = perfect; the issue's goal is <= 0.7):
  msp      -max softmax of the served copy's output (Hendrycks & Gimpel)
  energy   -logsumexp of the served copy's logits (Liu et al. 2020)
  stats    unsupervised: Mahalanobis distance of an image's (mean, std, fraction of near-black pixels,
           total variation) to those of 5,000 held-out training images; no query seen in fitting
  stats-lr supervised upper bound: a logistic regression on the same four statistics, trained on
           queries and test images (5-fold cross-validated scores), a leaker who has already
           collected some of our queries
Then the stealth/fidelity trade-off of A's margin: the copy edited with boundary margins 1..8 logits
(the library's edit, `edit.Basis` with another `margin`), its agreement with the master and the
detectors on its answers.

    python benchmarks/bench_blackbox_stealth.py --trained /tmp/bb/reg1/cache/fashion-cnn.safetensors \
        --out benchmarks/results/blackbox_stealth.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info  # noqa: E402
from bench_blackbox_designs import B_IDS, K, answered, issue_a, load, make_triggers, setup, train_b  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.model_selection import cross_val_predict  # noqa: E402

from wmtrace import fidelity, formats, schemes  # noqa: E402
from wmtrace.coding import codes  # noqa: E402
from wmtrace.data import MEAN, STD, load_fashion_mnist  # noqa: E402
from wmtrace.schemes.blackbox.scheme import Marker  # noqa: E402
from wmtrace.targets import Answers  # noqa: E402

NEGATIVES = 2000
HELD_OUT = 5000
POOL = 20000
MARGINS = (1.0, 2.0, 4.0, 8.0)


def image_stats(x: torch.Tensor) -> np.ndarray:
    """(n, 4): mean, std, fraction of near-black pixels, total variation, in pixel units [0, 1]: what a
    leaker can compute on an input without any model."""
    p = (x.double() * STD + MEAN).flatten(1).reshape(-1, 28, 28)
    tv = (p[:, 1:, :] - p[:, :-1, :]).abs().mean((1, 2)) + (p[:, :, 1:] - p[:, :, :-1]).abs().mean((1, 2))
    flat = p.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), (flat < 0.02).double().mean(1), tv], 1).numpy()


class Stats:
    """The unsupervised input detector: Mahalanobis distance to natural images' statistics."""

    def __init__(self, natural: torch.Tensor) -> None:
        s = image_stats(natural)
        self.mean = s.mean(0)
        self.precision = np.linalg.inv(np.cov(s.T) + 1e-9 * np.eye(s.shape[1]))

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        d = image_stats(x) - self.mean
        return np.einsum("ni,ij,nj->n", d, self.precision, d)


def output_scores(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    z = fidelity.outputs(model, x).double()
    return {"msp": -torch.softmax(z, 1).max(1).values.numpy(), "energy": -torch.logsumexp(z, 1).numpy()}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def detect(model: torch.nn.Module, queries: torch.Tensor, negatives: torch.Tensor, stats: Stats) -> dict:
    """AUROC of every detector for `queries` against `negatives`, both answered by `model`."""
    q, n = output_scores(model, queries), output_scores(model, negatives)
    row = {k: auroc(q[k], n[k]) for k in q}
    row["stats"] = auroc(stats(queries), stats(negatives))
    feats = np.r_[image_stats(queries), image_stats(negatives)]
    labels = np.r_[np.ones(len(queries)), np.zeros(len(negatives))]
    lr = LogisticRegression(max_iter=2000, class_weight="balanced")
    prob = cross_val_predict(lr, (feats - feats.mean(0)) / feats.std(0), labels, cv=5, method="predict_proba")
    row["stats-lr"] = float(roc_auc_score(labels, prob[:, 1]))
    row["mean_max_softmax"] = float(-q["msp"].mean())
    row["n"] = len(queries)
    return row


def b_copy(reg, m, master: torch.nn.Module, train, work: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """Design B's first noise copy and its triggers: the one bench_blackbox_designs.py saved under the
    same --work (same registry key, so the same triggers), else trained here."""
    key = reg.key(m.name)
    trig = make_triggers(key, "noise", train[0])
    path = work / "copies" / f"B-noise-{B_IDS}.safetensors"
    if path.exists():
        return load(path), trig.x
    ns = SimpleNamespace(b_lr=0.01, b_mix=16, b_max_steps=2000, check_every=10)
    r = train_b(master, trig, codes.codeword(key, m.name, B_IDS, m.config.code), train, ns, seed=B_IDS)
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.save_safetensors({k: v.contiguous() for k, v in r["model"].state_dict().items()}, path)
    return r["model"], trig.x


def smallest_margin(master: torch.nn.Module, pool: torch.Tensor, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """The `count` images of `pool` the master decides by the smallest logit margin, and those margins."""
    top2 = fidelity.outputs(master, pool).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    pick = np.argsort(margin)[:count]
    return pool[torch.from_numpy(pick)], margin[pick]


def margin_sweep(reg, m, plan, test, stats: Stats, negatives: torch.Tensor) -> list[dict]:
    """A's copy edited with larger boundary margins: more confident answers at the queries (harder for
    msp/energy) at the price of moving ordinary inputs more (agreement with the master)."""
    key, cfg = reg.key(m.name), m.config.schemes["blackbox"]
    marker = schemes.get("blackbox").issuer(None, m, cfg, key, reg.stored(m))
    bits = codes.codeword(key, m.name, 1, m.config.code)
    master_pred = fidelity.predictions(load(m.weights), test[0])
    boundary = torch.from_numpy(plan.inputs[:K])
    rows = []
    for margin in MARGINS:
        mk = Marker(dataclasses.replace(marker.cfg, margin=margin), dataclasses.replace(marker.basis, margin=margin),
                    marker.inputs)
        model = load(m.weights)
        mk.embed(model, bits, 0, None)
        pred = fidelity.predictions(model, test[0])
        soft = plan.read(Answers(labels=answered(model, boundary)), "top1")
        row = {"margin": margin, "agreement": float((pred == master_pred).float().mean()),
               "accuracy": float((pred == test[1]).float().mean()),
               "bits_right": float(np.mean(np.sign(soft) == 2.0 * bits - 1.0))}
        rows.append(row | detect(model, boundary, negatives, stats))
        print(rows[-1], flush=True)
    return rows


def query_sets(reg, m, plan, master, train, work: Path) -> list[tuple[str, torch.Tensor, torch.nn.Module, str]]:
    """(name, inputs, served copy, note) per query set."""
    ns = SimpleNamespace(buyers=1)
    try:
        a = issue_a(reg, m, plan, ns)[0].model
    finally:
        reg.release(m.name, [b.id for b in ns.pending])
    b, triggers = b_copy(reg, m, master, train, work)
    small, margins = smallest_margin(master, train[0][:POOL], K)
    note = f"master margin {np.median(margins):.3f} logits median, {margins.max():.3f} max"
    return [("A boundary queries (blends)", torch.from_numpy(plan.inputs[:K]), a, "A copy"),
            ("A natural queries (training images)", torch.from_numpy(plan.inputs[K:]), a, "A copy"),
            ("B noise triggers", triggers, b, "B copy"),
            (f"smallest-margin training images ({note})", small, a, "A copy (not edited for them)")]


def markdown(rows: list[dict], sweep: list[dict], info: dict, command: str) -> str:
    out = ["# Black-box stealth: can a leaker tell the queries from ordinary inputs?", "",
           f"Command: `{command}`", "",
           f"Machine: {info['machine']} (2-core CPU shared with other jobs, no GPU), torch {info['torch']}, "
           f"date {info['date']}. Negatives: the first {NEGATIVES} Fashion-MNIST test images, answered by the same "
           f"copy. AUROC: 0.5 = the detector is blind, 1.0 = it separates them perfectly; the goal is <= 0.7. "
           "msp = -max softmax, energy = -logsumexp(logits) of the served copy; stats = unsupervised "
           f"Mahalanobis distance of (mean, std, fraction of pixels < 0.02, total variation) to {HELD_OUT} "
           "held-out training images; stats-lr = logistic regression on the same statistics trained on "
           "queries vs test images (5-fold cross-validated; an upper bound: a leaker who already holds "
           "labelled queries). An AUROC well below 0.5 is as detectable as its mirror 1 - AUROC.", "",
           "| query set | n | served by | msp | energy | stats | stats-lr | mean max softmax (queries) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['set']} | {r['n']} | {r['served']} | {r['msp']:.3f} | {r['energy']:.3f} | "
                   f"{r['stats']:.3f} | {r['stats-lr']:.3f} | {r['mean_max_softmax']:.3f} |")
    out += ["", "## A's boundary margin: stealth against fidelity", "",
            "The same copy (buyer 1's codeword) edited with a larger logit margin at each boundary query "
            "(`edit.Basis.margin`; the library's default is 1). Agreement/accuracy on the 10,000 test images.", "",
            "| margin (logits) | agreement with master | test accuracy | top-1 bits right | msp AUROC | energy AUROC "
            "| mean max softmax (queries) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sweep:
        out.append(f"| {r['margin']:g} | {r['agreement']:.4f} | {r['accuracy']:.4f} | {r['bits_right']:.3f} | "
                   f"{r['msp']:.3f} | {r['energy']:.3f} | {r['mean_max_softmax']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trained", type=Path, default=None, help="an already trained example master (safetensors)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wmtrace-bb-bench"),
                    help="registry and copies, shared with bench_blackbox_designs.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/blackbox_stealth.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    reg, m = setup(args.work, args.trained)
    master = load(m.weights)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    plan = schemes.get("blackbox").plan(master, m.config.schemes["blackbox"], reg.key(m.name), reg.stored(m))
    stats = Stats(train[0][-HELD_OUT:])
    negatives = test[0][:NEGATIVES]
    rows = []
    for name, x, model, served in query_sets(reg, m, plan, master, train, args.work):
        rows.append({"set": name, "served": served} | detect(model, x, negatives, stats))
        print(rows[-1], flush=True)
    sweep = margin_sweep(reg, m, plan, test, stats, negatives)
    info = run_info()
    info["machine"] += f", {time.perf_counter() - t0:.0f} s for the whole run"
    command = "python benchmarks/bench_blackbox_stealth.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, sweep, info, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
