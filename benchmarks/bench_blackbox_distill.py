"""Does a surrogate distilled from a buyer's copy still name the buyer? (issue: >= 90% of 10 runs, 2
architectures, soft answers; hard labels reported as they come.)

The leaker queries the copy on their own natural data (the Fashion-MNIST training split, never its
labels) and trains a fresh model from scratch on the answers: soft (KL at temperature 4, Hinton et
al.) or hard (cross-entropy on the copy's top-1). We then query the surrogate as a black box with full
scores (`wmtrace.query`'s plan: 256 boundary queries, then 2,048 natural ones) and report the verdict,
queries used and bound, the surrogate's agreement with the copy and its accuracy. One master per tilt
(the scheme's strength on ordinary inputs) is registered on the same trained weights, so the fidelity
cost of each tilt is measured beside what it buys.

    python benchmarks/bench_blackbox_distill.py --trained fashion-cnn.safetensors --tilts 0.02,0.05 \\
        --runs 10 --hard-runs 3 --epochs 3 --out results/blackbox_distill.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import run_info, write_json
from torch import nn

from wmtrace import api, example, modelio, schemes
from wmtrace.coding import accuse, codes
from wmtrace.data import load_fashion_mnist
from wmtrace.pipeline.query import query_target
from wmtrace.schemes.blackbox import read
from wmtrace.targets import ModuleTarget


def mlp() -> nn.Module:
    """The other architecture: no convolutions at all."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


ARCHS = {"cnn": example.build, "mlp": mlp}


def master_for(reg, trained: Path, tilt: float):
    name = f"cnn-tilt{tilt:g}"
    for m in reg.masters():
        if m.name == name:
            return m
    return api.init(reg, name, trained, "wmtrace.example:build", data="wmtrace.example:dataset", bb_tilt=tilt)


def distill(teacher: nn.Module, arch: str, seed: int, x: torch.Tensor, epochs: int, hard: bool,
            batch: int, lr: float) -> nn.Module:
    """A fresh `arch` trained from scratch on the teacher's answers over `x` (no labels read)."""
    torch.manual_seed(1000 + seed)
    student = ARCHS[arch]().to(x.device)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(len(x) // batch):
            xb = x[order[i * batch:(i + 1) * batch]]
            with torch.no_grad():
                t = teacher(xb)
            s = student(xb)
            if hard:
                loss = F.cross_entropy(s, t.argmax(1))
            else:
                loss = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), log_target=True,
                                reduction="batchmean") * 16
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return student.eval()


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        pa = torch.cat([a(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
        pb = y if y is not None else torch.cat([b(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)])
    return float((pa == pb).float().mean())


def one_tilt(reg, trained: Path, tilt: float, args, data) -> list[dict]:
    x, xt, yt = data
    m = master_for(reg, trained, tilt)
    have = [b for b in reg.buyers(m.name) if b.status == "issued"]
    b = have[0] if have else api.issue(reg, buyers=1, master=m.name, out=Path(args.registry) / "copies")[0]
    teacher = example.build()
    teacher.load_state_dict(_load(b.file), strict=False)
    teacher = teacher.to(x.device).eval()
    rows = []
    plan = make_plan(reg, m)
    extra = {n: make_plan(reg, m, x[-n:]) for n in args.natural}  # the attacker's split's tail: unseen at init
    todo = [(arch, False, r) for arch in args.archs for r in range(args.runs)]
    todo += [(arch, True, r) for arch in args.archs for r in range(args.hard_runs)]
    for arch, hard, run in todo:
        t0 = time.perf_counter()
        student = distill(teacher, arch, run, x, args.epochs, hard, args.batch, args.lr)
        seconds = time.perf_counter() - t0
        r = query_target(ModuleTarget(student, f"{arch}-{run}", reveal="scores"), reg, m.name)
        z = reading_scores(reg, m, b, student, plan)
        for n, more in extra.items():
            z[f"z_natural_{n}"] = reading_scores(reg, m, b, student, more)["z_plain"]
        rows.append({"tilt": tilt, "arch": arch, "answers": "hard" if hard else "soft", "run": run,
                     "copy_agreement": b.agreement, "copy_accuracy": b.accuracy,
                     "student_agreement": agreement(student, teacher, xt),
                     "student_accuracy": agreement(student, teacher, xt, yt),
                     "verdict": r.verdict, "named": bool(r.buyer and r.buyer["id"] == b.id),
                     "innocent_named": bool((r.buyer and r.buyer["id"] != b.id)
                                            or any(c["id"] != b.id for c in r.colluders)),
                     "queries": r.queries, "bound": r.false_positive_probability, "train_seconds": round(seconds, 1),
                     **z})
        print(rows[-1], flush=True)
    return rows


def make_plan(reg, m, natural: torch.Tensor | None = None):
    """The query plan; `natural` replaces the stored natural queries (to measure what more would buy)."""
    model, _ = modelio.build(m)
    stored = dict(reg.stored(m))
    if natural is not None:
        stored["blackbox.natural"] = natural.cpu().double().numpy()
    return schemes.get("blackbox").plan(model, m.config.schemes["blackbox"], reg.key(m.name), stored)


def reading_scores(reg, m, b, student: nn.Module, plan) -> dict:
    """The buyer's accusation score z from all planned answers, read with and without the nuisance
    map (`read._least_squares`), beside the threshold for 1e-6 among 50 buyers."""
    key = reg.key(m.name)
    answers = ModuleTarget(student, "s", reveal="scores").answer(plan.inputs)
    word = codes.codewords(key, m.name, [b.id], m.config.code)
    out = {"z_threshold_50": round(accuse.threshold(50, 1e-6), 2)}
    for name, flag in (("z_plain", False), ("z_nuisance", True)):
        read.NUISANCE = flag
        soft = plan.read(answers, "scores")
        out[name] = round(float(accuse.scores(soft, word, m.config.code)[0]), 2)
    read.NUISANCE = True
    return out


def _load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default="/tmp/wmtrace-bench-distill")
    p.add_argument("--trained", type=Path, required=True, help="a trained example master (.safetensors)")
    p.add_argument("--tilts", default="0.02,0.05")
    p.add_argument("--archs", default="cnn,mlp")
    p.add_argument("--runs", type=int, default=5, help="soft-answer students per architecture")
    p.add_argument("--hard-runs", type=int, default=2, help="hard-label students per architecture")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--natural", default="", help="also read with this many natural queries (comma-separated)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/blackbox_distill.json"))
    args = p.parse_args()
    args.archs = args.archs.split(",")
    args.natural = [int(n) for n in args.natural.split(",") if n]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = load_fashion_mnist("train")[0].to(device)
    xt, yt = (t.to(device) for t in load_fashion_mnist("test"))
    reg = api.open_registry(args.registry, create=True)
    rows = []
    for tilt in [float(t) for t in args.tilts.split(",")]:
        rows += one_tilt(reg, args.trained, tilt, args, (x, xt, yt))
        info = run_info() | {"device": device}
        write_json(args.out, {"run": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
