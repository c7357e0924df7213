"""Robustness report: every attack family over a range of strengths, on the example master.

    OMP_NUM_THREADS=1 python benchmarks/bench_robustness.py [--registry DIR] [--families a,b] [--quick]

For each attacked copy of one issued buyer: the bit error rate against that buyer's codeword before
error correction (over the bits still present; also with the plain projection of the difference to the
master, a trimmed mean over filters, instead of the least-squares fit `trace` uses, to compare
extractions), the verdict, whether the right buyer was named, whether a
wrong one was (never expected), and the attacker's test accuracy on the 10,000 Fashion-MNIST test
images (for `transfer`, on the attacker's new task: the same images in four coarse groups). Writes
benchmarks/results/robustness.{csv,json} and robustness.png (needs the `report` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from wmtrace import api, attacks, example, fidelity, formats
from wmtrace.data import MEAN, STD, load_fashion_mnist
from wmtrace.pipeline.trace import trace_tensors
from wmtrace.schemes.whitebox import Config, align, scales
from wmtrace.schemes.whitebox.extract import extract, master_arrays

# Sweeps of the training attacks (each point is a full training run except fine-tuning, whose points are
# snapshots of one run); override with --epochs / --overwrite-steps / --shifts.
EPOCHS = [0.1, 0.25, 0.5, 1.0, 2.0]
OVERWRITE_STEPS = [25, 50, 100, 300]
SHIFTS = [0.1, 0.3, 1.0, 3.0]
SHIFT_STEPS = 200
DISTILL_EPOCHS = [1.0, 3.0]
FAMILIES = ["prune-global", "prune-layer", "prune-random", "prune-filters", "prune-filters-all", "quantize",
            "onnx", "noise", "permute", "project", "project-filters", "finetune-0.05", "finetune-0.01", "transfer-0.05",
            "transfer-0.01", "transfer-last-0.05", "overwrite", "shift", "distill"]


class Bench:
    def __init__(self, reg, leaker, others, out: Path) -> None:
        self.reg, self.leaker, self.out = reg, leaker, out
        self.m = reg.master(leaker.master)
        self.arrays = master_arrays(self.m)
        self.config = Config.of(self.m)
        self.carriers = list(self.config.carriers)
        self.key = reg.key(self.m.name)
        self.metrics = reg.stored(self.m)
        self.truth = np.unpackbits(np.frombuffer(bytes.fromhex(leaker.codeword), np.uint8))
        self.inputs, self.labels = load_fashion_mnist("test")
        self.rows: list[dict] = []
        self.state = load_file(leaker.file)
        self.others = [np.unpackbits(np.frombuffer(bytes.fromhex(b.codeword), np.uint8)) for b in others]

    def ber(self, tensors: dict[str, np.ndarray], how: str = "fit") -> tuple[float, int, float]:
        """BER against the leaker's codeword, bits missing, and the lowest BER against another buyer's.
        `fit`: trace's extraction; `projection`: each bit's signed projection of the difference to the
        master, trimmed mean over filters (missing weights read as no change)."""
        found = align.locate(tensors, self.arrays, self.carriers)
        if how == "fit":
            soft = extract(found, self.arrays, self.key, self.config, self.m.config.code.bits, self.metrics)
        else:
            soft = np.full(len(self.truth), np.nan)
            for loc in found:
                if loc is None:
                    continue
                c, secret = loc.carrier, loc.carrier.secret(self.key)
                delta = loc.weight - self.arrays[c.name].reshape(c.rows, -1)
                rows = ~np.isnan(delta).all(1)
                if rows.any():
                    per_row = (np.nan_to_num(delta[rows]) @ secret.x.T) * secret.signs[:, rows].T
                    soft[c.start : c.start + c.bits] = scales.robust_mean_rows(per_row)
        known = ~np.isnan(soft)
        if not known.any():
            return float("nan"), int(len(soft)), float("nan")
        bits = soft[known] > 0
        other = min(float((bits != o[known]).mean()) for o in self.others)
        return float((bits != self.truth[known]).mean()), int((~known).sum()), other

    def record(self, family: str, strength, state=None, path: Path | None = None, accuracy: float | None = None,
               **extra) -> None:
        if path is None:
            path = self.out / "leak.safetensors"
            formats.save_safetensors(state, path)
        tensors = formats.load_tensors(path)
        t0 = time.perf_counter()
        result = trace_tensors(tensors, self.reg, str(path))
        trace_s = time.perf_counter() - t0
        if accuracy is None:
            model = example.build_like(attacks.dequantize(state))
            accuracy = fidelity.evaluate(model, self.inputs, self.labels)
        ber, missing, ber_other = self.ber(tensors, "fit")
        ber_projection, _, _ = self.ber(tensors, "projection")
        # Named by decoding, or by score alone (a mark too weak to decode, or merged copies).
        named = {result.buyer["id"]} if result.buyer else {c["id"] for c in result.colluders}
        row = {
            "family": family, "strength": strength, "verdict": result.verdict, "named": sorted(named),
            "identified": self.leaker.id in named and len(named) == 1, "wrong_buyer": bool(named - {self.leaker.id}),
            "ber": round(ber, 4), "ber_projection": round(ber_projection, 4),
            "ber_nearest_other_buyer": round(ber_other, 4),
            "bits_missing": missing,
            "symbol_errors": result.symbol_errors, "erasures": result.erasures,
            "false_positive_probability": result.false_positive_probability,
            "accuracy": round(accuracy, 4), "trace_s": round(trace_s, 3), **extra,
        }
        self.rows.append(row)
        print(f"{family:18s} {strength!s:>8} {result.verdict:13s} right={row['identified']!s:5} "
              f"ber={ber:.3f} (projection {ber_projection:.3f}, other buyers >= {ber_other:.3f}) missing={missing:3d} "
              f"acc={accuracy:.4f}", flush=True)


def run(bench: Bench, family: str, quick: bool, tmp: Path) -> None:
    s, carriers = bench.state, [c.name for c in bench.carriers]
    trainer = attacks.Trainer(example.build, example.dataset, seed=0)
    if family == "clean":
        bench.record("clean", 0, s)
    elif family.startswith("prune-") and family in ("prune-global", "prune-layer", "prune-random"):
        mode = family.split("-")[1]
        for a in [0.5, 0.8, 0.9, 0.95, 0.97, 0.99]:
            bench.record(family, a, attacks.prune(s, a, mode, seed=1))
    elif family == "prune-filters":
        for a in [0.25, 0.5, 0.6, 0.7, 0.8]:
            bench.record(family, a, attacks.prune_filters(s, a, carriers))
    elif family == "prune-filters-all":
        for a in [0.25, 0.5, 0.6, 0.7]:
            bench.record(family, a, attacks.prune_filters(s, a))
    elif family == "quantize":
        for mode in attacks.QUANT_MODES:
            bench.record(family, mode, attacks.quantize(s, mode))
    elif family == "onnx":
        model = example.build_like(s)
        path = tmp / "leak.onnx"
        formats.export_onnx(model, bench.inputs[:1], path)
        acc = _onnx_accuracy(path, bench)
        bench.record(family, "export", path=path, accuracy=acc)
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = tmp / "leak-int8.onnx"
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, per_channel=True)
        bench.record(family, "export+int8-dynamic", path=qpath, accuracy=_onnx_accuracy(qpath, bench))
    elif family == "noise":
        for a in [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]:
            bench.record(family, a, attacks.noise(s, a, seed=1))
    elif family == "permute":
        for a in [0.0, 0.25, 0.5, 1.0]:
            bench.record(family, a, attacks.permute(s, a, seed=1))
    elif family == "project":
        for a in [0.1, 0.25, 0.5, 0.75, 0.9]:
            bench.record(family, a, attacks.project(s, a, trainer))
    elif family == "project-filters":
        for a in [0.1, 0.25, 0.5, 0.75]:
            bench.record(family, a, attacks.project(s, a, trainer, part="filters"))
    elif family.startswith("finetune"):
        lr = float(family.split("-")[1])
        epochs = [0.1, 0.5] if quick else EPOCHS
        per = trainer.steps_per_epoch()
        marks = {round(e * per): e for e in epochs}

        def snap(step, model):
            if step in marks:
                bench.record(family, marks[step], {k: v.detach().clone() for k, v in model.state_dict().items()},
                             lr=lr)
                model.train()

        attacks.finetune(s, max(epochs), trainer, lr, callback=snap)
    elif family.startswith("transfer"):
        _transfer(bench, family, [0.1, 0.5] if quick else EPOCHS, trainer)
    elif family == "overwrite":
        for steps in ([50] if quick else OVERWRITE_STEPS):
            report: dict = {}
            state = attacks.overwrite(s, steps, trainer, report=report)
            bench.record(family, steps, state, attacker_ber=report["attacker_ber"])
    elif family == "shift":
        for a in ([0.3] if quick else SHIFTS):
            bench.record(family, a, attacks.shift(s, a, trainer, steps=SHIFT_STEPS), steps=SHIFT_STEPS)
    elif family == "distill":
        _distill(bench, [0.5, 1.0] if quick else DISTILL_EPOCHS, trainer)
    else:
        raise SystemExit(f"unknown family {family}")


def inverted(split: str) -> TensorDataset:
    """Fashion-MNIST with inverted pixels (dark garments on white): data the copy has never seen."""
    x, y = load_fashion_mnist(split)
    return TensorDataset((1.0 - 2 * MEAN) / STD - x, y)


def _transfer(bench: Bench, family: str, epochs: list[float], trainer: attacks.Trainer) -> None:
    """`transfer-[last-|inverted-]LR`: new head for the coarse task, snapshots of one run at each epoch
    count; the accuracy recorded is the new task's (the example's own head is gone). `inverted` trains
    and evaluates on inverted images, a shifted domain that moves the features further."""
    lr, tune = float(family.rsplit("-", 1)[1]), ("last" if "-last-" in family else "all")
    if "-inverted-" in family:
        trainer = attacks.Trainer(example.build, inverted, seed=0)
    labels = torch.tensor(attacks.COARSE_GROUPS)
    per = trainer.steps_per_epoch()
    marks = {round(e * per): e for e in epochs}

    def snap(step, model):
        if step in marks:
            acc = attacks.task_accuracy(model, trainer, labels)
            bench.record(family, marks[step], {k: v.detach().clone() for k, v in model.state_dict().items()},
                         accuracy=acc, lr=lr, tune=tune)
            model.train()

    attacks.transfer(bench.state, max(epochs), trainer, lr, tune, callback=snap)


def _distill(bench: Bench, epochs: list[float], trainer: attacks.Trainer) -> None:
    """`distill`: the copy distilled into a fresh model of its architecture on the attacker's own data,
    Fashion-MNIST's training split without its labels (`attacks.distill` with its defaults: seed 0, lr
    0.05, temperature 4); snapshots of one run at each epoch count. Besides the usual columns: the
    student's top-1 agreement with the copy on the 10,000 test images, and the cosine between the
    student's and the copy's carrier weights (the student starts from random weights, so the mark
    can only come through the outputs)."""
    copy_predictions = fidelity.predictions(example.build_like(bench.state), bench.inputs)
    per = trainer.steps_per_epoch()
    marks = {round(e * per): e for e in epochs}

    def cosine(state: dict[str, torch.Tensor]) -> float:
        pairs = [(state[c.name].flatten().double(), bench.state[c.name].flatten().double()) for c in bench.carriers]
        return float(np.mean([float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in pairs]))

    def snap(step, model):
        if step in marks:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            agree = fidelity.predictions(example.build_like(state), bench.inputs) == copy_predictions
            bench.record("distill", marks[step], state, agreement=round(float(agree.float().mean()), 4),
                         carrier_cosine=round(cosine(state), 4))
            model.train()

    attacks.distill(bench.state, max(epochs), trainer, callback=snap)


def _onnx_accuracy(path: Path, bench: Bench) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    preds = np.concatenate([session.run(None, {name: bench.inputs[i : i + 1000].numpy()})[0].argmax(1)
                            for i in range(0, len(bench.inputs), 1000)])
    return float((torch.from_numpy(preds) == bench.labels).float().mean())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [f for f in dict.fromkeys(r["family"] for r in rows)
               if f != "clean" and all(isinstance(r["strength"], (int, float)) for r in rows if r["family"] == f)]
    cols = 4
    n_rows = (len(numeric) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, fam in zip(axes.flat, numeric, strict=False):
        rs = [r for r in rows if r["family"] == fam]
        x = [r["strength"] for r in rs]
        ax.plot(x, [np.nan if r["ber"] is None else r["ber"] for r in rs], "o-", color="tab:red",
                label="bit error rate")
        ax.plot(x, [1.0 if r["identified"] else 0.0 for r in rs], "s--", color="tab:green", label="buyer named")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(fam)
        ax.set_xlabel("strength")
        ax2 = ax.twinx()
        ax2.plot(x, [r["accuracy"] for r in rs], "^:", color="tab:blue", label="attacker's accuracy")
        ax2.set_ylim(0, 1)
        if ax is axes.flat[0]:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    for ax in list(axes.flat)[len(numeric):]:
        ax.axis("off")
    fig.suptitle("wmtrace robustness on the example master: BER before correction, buyer named (1/0), accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def markdown(rows: list[dict]) -> str:
    """The table for BENCHMARKS.md."""
    out = ["| attack | strength | verdict | right buyer | wrong buyer | BER | BER, plain projection "
           "| BER vs nearest other buyer | bits missing | symbol errors (12 correctable) | attacker's accuracy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    def f(v) -> str:
        return "-" if v is None or v != v else f"{v:.3f}"

    for r in rows:
        out.append(f"| {r['family']} | {r['strength']} | {r['verdict']} | {'yes' if r['identified'] else 'no'} "
                   f"| {'YES' if r['wrong_buyer'] else 'no'} | {f(r['ber'])} | {f(r.get('ber_projection'))} "
                   f"| {f(r['ber_nearest_other_buyer'])} | {r['bits_missing']} "
                   f"| {'-' if r.get('symbol_errors') is None else r['symbol_errors']} | {r['accuracy']:.2%} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="registry with the example master (reused; else a temporary one)")
    ap.add_argument("--families", default=",".join(["clean", *FAMILIES]))
    ap.add_argument("--quick", action="store_true", help="fewer strengths for the training attacks")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--from-json", action="store_true", help="only redraw the plot and table from robustness.json")
    ap.add_argument("--epochs", help="fine-tuning snapshots, e.g. 0.25,0.5,1")
    ap.add_argument("--overwrite-steps", help="e.g. 50,100,300")
    ap.add_argument("--shifts", help="weight-shifting strengths, e.g. 1,3")
    ap.add_argument("--shift-steps", type=int)
    ap.add_argument("--distill-epochs", help="distillation snapshots, e.g. 1,3")
    args = ap.parse_args()
    global EPOCHS, OVERWRITE_STEPS, SHIFTS, SHIFT_STEPS, DISTILL_EPOCHS
    EPOCHS = [float(v) for v in args.epochs.split(",")] if args.epochs else EPOCHS
    OVERWRITE_STEPS = [int(v) for v in args.overwrite_steps.split(",")] if args.overwrite_steps else OVERWRITE_STEPS
    SHIFTS = [float(v) for v in args.shifts.split(",")] if args.shifts else SHIFTS
    SHIFT_STEPS = args.shift_steps or SHIFT_STEPS
    DISTILL_EPOCHS = [float(v) for v in args.distill_epochs.split(",")] if args.distill_epochs else DISTILL_EPOCHS
    if args.from_json:
        rows = json.loads((args.out / "robustness.json").read_text())["rows"]
        plot(rows, args.out / "robustness.png")
        (args.out / "robustness.md").write_text(markdown(rows))
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        m, buyers = _common.example_buyers(reg, Path(tmp) / "buyers")
        bench = Bench(reg, buyers[0], buyers[1:3], Path(tmp))
        for fam in args.families.split(","):
            run(bench, fam, args.quick, Path(tmp))
    rows = bench.rows
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}, "
        f"torch {torch.__version__}, 1 thread", "master_accuracy": m.accuracy, "buyers_registered": 3,
        "leaker": buyers[0].id, "trim": scales.TRIM, "seconds": round(time.time() - t0, 1),
        "wrong_buyer_total": sum(r["wrong_buyer"] for r in rows),
    }
    (args.out / "robustness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "robustness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    (args.out / "robustness.md").write_text(markdown(rows))
    try:
        plot(rows, args.out / "robustness.png")
    except ImportError:
        print("matplotlib missing (pip install -e '.[report]'): no plot written")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
