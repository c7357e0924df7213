"""The fine-tuning frontier: a leaker's optimizer, rate, weight decay, augmentation, length and layers,
against the verdict, on the example CNN.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py [--registry DIR] [--workers 2] [--settings 0,3]

Each setting of `GRID` is one training run of `attacks.finetune` on buyer 1's copy with snapshots at
its epoch counts (the example master trains for 2 epochs: 8 epochs is 4x its length). At each snapshot:
test accuracy on the 10,000 Fashion-MNIST test images and its drop from the copy's, the verdict, who
was named, the true buyer's score against the score the bound needs (`z_buyer`, `z_needed`: how much
evidence is left), the highest innocent buyer's score, and each carrier's filter similarity and how it
was located. Writes benchmarks/results/finetune.json and finetune.png (needs the `report` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import _common
import torch
from safetensors.torch import load_file

from wmtrace import api, attacks, example
from wmtrace.data import load_fashion_mnist

# (optimizer, lr, weight decay (None: the optimizer's usual), augment, last layers (0: all), epochs)
GRID = [
    ("sgd", 0.05, None, False, 0, [0.5, 1, 2, 4, 8]),  # the master's own recipe and peak rate
    ("sgd", 0.2, None, False, 0, [0.5, 1, 2, 4]),
    ("sgd", 0.05, 0.0, True, 0, [1, 2, 4]),
    ("adam", 1e-3, None, False, 0, [0.5, 1, 2, 4, 8]),
    ("adam", 5e-3, None, False, 0, [0.5, 1, 2, 4]),
    ("adamw", 1e-3, 0.01, False, 0, [0.5, 1, 2, 4, 8]),
    ("adamw", 3e-3, 0.0, False, 0, [0.5, 1, 2, 4]),
    ("adamw", 3e-3, 0.1, True, 0, [0.5, 1, 2, 4]),
    ("adamw", 1e-2, 0.1, True, 0, [0.5, 1, 2]),
    ("adamw", 1e-2, 0.01, False, 2, [0.5, 1, 2, 4]),
]


def setting_name(s: tuple) -> str:
    opt, lr, wd, aug, last, _ = s
    return (f"{opt} lr {lr:g}" + ("" if wd is None else f" wd {wd:g}") + (" aug" if aug else "")
            + (f" last {last}" if last else ""))


def run_setting(registry: str, leaker: int, setting: tuple) -> list[dict]:
    torch.set_num_threads(1)
    opt, lr, wd, aug, last, epochs = setting
    reg = api.open_registry(registry)
    b = next(x for x in reg.buyers(api.EXAMPLE_MASTER) if x.id == leaker)
    m = reg.master(b.master)
    state = load_file(b.file)
    x, y = load_fashion_mnist("test")
    copy_acc = _common.example_accuracy(state, x, y)
    trainer = attacks.Trainer(example.build, example.dataset, seed=0)
    marks = {round(e * trainer.steps_per_epoch()): e for e in epochs}
    rows: list[dict] = []
    t0 = time.perf_counter()

    def snap(step: int, model: torch.nn.Module) -> None:
        if step not in marks:
            return
        s = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tensors = {k: v.numpy() for k, v in s.items()}
        acc = _common.example_accuracy(s, x, y)
        rows.append({
            "setting": setting_name(setting), "optimizer": opt, "lr": lr, "weight_decay": wd, "augment": aug,
            "last": last, "epochs": marks[step], "accuracy": round(acc, 4), "copy_accuracy": round(copy_acc, 4),
            "drop_points": round(100 * (copy_acc - acc), 2),
            **_common.verdict_row(reg, m, tensors, leaker), "seconds": round(time.perf_counter() - t0, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
        model.train()

    attacks.finetune(state, max(epochs), trainer, lr, opt, wd, aug, last, callback=snap)
    reg.close()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r["setting"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        pts = [r for r in rows if r["setting"] == name]
        ax.plot([r["drop_points"] for r in pts], [r["z_buyer"] for r in pts], "-", color=cmap(i % 10), lw=1,
                label=name)
        for r in pts:
            marker = "o" if r["verdict"] == "identified" else ("s" if r["right"] else "x")
            ax.plot(r["drop_points"], r["z_buyer"], marker, color=cmap(i % 10), ms=6,
                    mfc="none" if marker == "s" else None)
            ax.annotate(f"{r['epochs']:g}", (r["drop_points"], r["z_buyer"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    need = rows[0]["z_needed"]
    ax.axhline(need, color="k", ls="--", lw=0.8)
    ax.text(ax.get_xlim()[0], need, f" bound 1e-6 needs z >= {need}", va="bottom", fontsize=8)
    ax.axvline(5, color="grey", ls=":", lw=0.8)
    ax.text(5, ax.get_ylim()[1], " 5-point budget", va="top", fontsize=8, color="grey")
    ax.set_xlabel("attacker's accuracy cost (points below the copy)")
    ax.set_ylabel("the leaker's score z (evidence left)")
    ax.set_title("Fine-tuning the example CNN's copy: o identified, \u25a1 named by score, x nobody named "
                 "(numbers: epochs)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="registry with the example master and buyers (else a new one)")
    ap.add_argument("--leaker", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settings", help="indices into GRID, e.g. 0,3 (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    ap.add_argument("--from-json", action="store_true", help="only redraw the plot from --out")
    args = ap.parse_args()
    if args.from_json:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return
    todo = [GRID[int(i)] for i in args.settings.split(",")] if args.settings else GRID
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        m, _ = _common.example_buyers(reg, Path(tmp) / "buyers")
        root = str(reg.root)
        reg.close()
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_setting, [root] * len(todo), [args.leaker] * len(todo), todo))
    rows = [r for rs in results for r in rs]
    info = _common.run_info() | {"workers": args.workers, "threads_per_worker": 1,
                                 "seconds": round(time.time() - t0, 1), "master_accuracy": m.accuracy}
    _common.write_json(args.out, {"info": info, "rows": rows})
    plot(rows, args.out.with_suffix(".png"))
    print(f"{len(rows)} snapshots, wrong buyer named: {sum(r['wrong_buyer'] for r in rows)}; "
          f"within 5 points and not named: {sum(r['drop_points'] <= 5 and not r['right'] for r in rows)}")


if __name__ == "__main__":
    main()
