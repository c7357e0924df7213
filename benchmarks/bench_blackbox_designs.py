"""Black-box marks, two designs side by side on the example CNN: what each costs and what survives.

  A  wmtrace's scheme as the library does it: 256 boundary queries (blends of two training images on
     the master's decision boundary) and a closed-form edit of the head per buyer, no training.
  B  Zhang et al. (2018) made per buyer: 256 keyed trigger images ("noise": uniform-noise images, the
     brief's reading of Zhang's noise kind; "content": training images with a keyed 8x8 stamp), each
     trigger with two keyed candidate labels, the codeword bit choosing one (masked with keyed signs as
     A is); the copy is fine-tuned from the master on batches of 64 training images plus 16 triggers
     until every trigger answers its label. Zhang's "unrelated" kind needs a second dataset (MNIST for
     Fashion-MNIST) that this machine does not have.

Both are read the same way, from top-1 labels only: a query answered with the bit's class reads
+1/-1 before unmasking, any other class is a missing bit; ID bits are queried last (not scored), and
the score is `coding.accuse.scores` of the true codeword among 50 buyers, against the threshold of a
1e-6 false-accusation bound (`accuse.threshold(50, 1e-6)`). A is also queried through `wmtrace.query`
(its looks at 64, 128, 256 answers). Robustness: the fine-tuning attack (1 epoch on natural data,
`attacks.finetune`) and distillation into a fresh model (`attacks.distill`) on the first
`--attack-buyers` copies of each design.

    python benchmarks/bench_blackbox_designs.py --trained /tmp/bb/reg1/cache/fashion-cnn.safetensors \
        --buyers 5 --attack-buyers 2 --out benchmarks/results/blackbox_designs.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info  # noqa: E402

from wmtrace import api, example, fidelity, formats, schemes  # noqa: E402
from wmtrace.attacks.distill import distill  # noqa: E402
from wmtrace.attacks.finetune import finetune  # noqa: E402
from wmtrace.attacks.trainer import Trainer, sgd  # noqa: E402
from wmtrace.coding import accuse, codes, keys  # noqa: E402
from wmtrace.data import MEAN, STD, load_fashion_mnist  # noqa: E402
from wmtrace.pipeline.query import query_target  # noqa: E402
from wmtrace.registry import Master, Registry  # noqa: E402
from wmtrace.targets import Answers, ModuleTarget  # noqa: E402

MASTER = "fashion-bb"
MASTER_STEPS = 2 * (60000 // 64)  # the example master: 2 epochs of 937 steps, batch 64
K = 256
ID_BITS = 8 * codes.ID_BYTES
ORDER = np.r_[np.arange(ID_BITS, K), np.arange(ID_BITS)]  # query slot -> bit; ID bits last, as A's plan
POPULATION, BOUND = 50, 1e-6
B_IDS = 5001  # design B's buyers (not in the registry): IDs from here
INNOCENT_IDS = range(9001, 9001 + POPULATION - 1)


def setup(work: Path, trained: Path | None) -> tuple[Registry, Master]:
    """A registry with the example master under the black-box scheme alone (reused between runs, and
    by bench_blackbox_stealth.py); `trained` saves the 2-epoch training (~2 min)."""
    reg = api.open_registry(work / "registry", create=True)
    for m in reg.masters():
        if m.name == MASTER:
            return reg, m
    weights = work / "master.safetensors"
    if not weights.exists():
        if trained is not None:
            shutil.copy(trained, weights)
        else:
            example.train_master(weights, epochs=2)
    return reg, api.init(reg, MASTER, weights, api.EXAMPLE_FACTORY, data=api.EXAMPLE_DATA, scheme_names=["blackbox"])


def load(path: str | Path) -> torch.nn.Module:
    """A weight file as the example CNN, in eval mode."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(path).items()}
    return example.build_like(state)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@dataclass
class Triggers:
    """Design B's secrets: trigger images, each trigger's two candidate labels, the keyed whitening signs."""

    kind: str
    x: torch.Tensor  # (K, 1, 28, 28), normalised like the training data
    pairs: np.ndarray  # (K, 2) candidate labels (a, b): bit sign -1 answers a, +1 answers b
    mask: np.ndarray  # (K,) keyed +-1

    def labels(self, bits: np.ndarray) -> np.ndarray:
        """The label each trigger must answer in the copy carrying codeword `bits` (0/1)."""
        s = self.mask * (2.0 * bits - 1.0)
        return np.where(s > 0, self.pairs[:, 1], self.pairs[:, 0])

    def inputs(self) -> np.ndarray:
        """The triggers in query order (ID bits last)."""
        return self.x[torch.from_numpy(ORDER)].numpy()

    def soft(self, labels: np.ndarray) -> np.ndarray:
        """Soft bits (+-1, NaN missing) from top-1 answers to the first len(labels) queries."""
        t = ORDER[: len(labels)]
        per = np.where(labels == self.pairs[t, 1], 1.0, np.where(labels == self.pairs[t, 0], -1.0, np.nan))
        soft = np.full(K, np.nan)
        soft[t] = per * self.mask[t]
        return soft


def make_triggers(key: bytes, kind: str, train_x: torch.Tensor) -> Triggers:
    """Keyed triggers of Zhang's `kind`: everything from the master key, nothing from public data
    but the training images a content trigger is stamped on."""
    label = f"bench/zhang/{kind}"
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(keys.derive(key, label)).digest()[:16], "big"))
    if kind == "noise":
        pixels = rng.random((K, 1, 28, 28), dtype=np.float32)
        x = (torch.from_numpy(pixels) - MEAN) / STD
    elif kind == "content":
        x = train_x[torch.from_numpy(rng.choice(len(train_x), K, replace=False))].clone()
        stamp = torch.from_numpy(rng.random((8, 8)) < 0.5)
        x[:, 0, 19:27, 1:9] = torch.where(stamp, (1.0 - MEAN) / STD, x[:, 0, 19:27, 1:9])
    else:
        raise ValueError(f"unknown trigger kind {kind!r}")
    a = rng.integers(0, 10, K)
    b = (a + rng.integers(1, 10, K)) % 10
    mask = keys.signs(key, f"{label}/mask", 1, K)[0]
    return Triggers(kind, x.float().contiguous(), np.stack([a, b], 1), mask)


def answered(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).argmax(1).numpy()


def train_b(master: torch.nn.Module, trig: Triggers, bits: np.ndarray, train, args, seed: int) -> dict:
    """Fine-tune a copy of the master on natural batches mixed with triggers until all triggers answer
    their labels (checked in eval mode every `check_every` steps): Zhang's embedding, per buyer."""
    model = example.build()
    model.load_state_dict(master.state_dict())
    target = torch.from_numpy(trig.labels(bits)).long()
    x, y = train
    opt = sgd(list(model.parameters()), args.b_lr)
    g = torch.Generator().manual_seed(seed)
    t0, step, done = time.perf_counter(), 0, False
    while step < args.b_max_steps:
        if step % args.check_every == 0 and (answered(model, trig.x) == target.numpy()).all():
            done = True
            break
        model.train()
        i = torch.randint(len(x), (64,), generator=g)
        j = torch.randint(K, (args.b_mix,), generator=g)
        loss = F.cross_entropy(model(torch.cat([x[i], trig.x[j]])), torch.cat([y[i], target[j]]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    done = done or bool((answered(model, trig.x) == target.numpy()).all())
    seconds = time.perf_counter() - t0
    return {"model": model.eval(), "steps": step, "seconds": seconds, "all_triggers": done,
            "compute_fraction": step * (64 + args.b_mix) / 64 / MASTER_STEPS}


@dataclass
class Copy:
    """One buyer's copy of either design, with how its top-1 answers become soft bits."""

    design: str
    buyer: int
    model: torch.nn.Module
    bits: np.ndarray
    inputs: np.ndarray  # the K queries in the order sent
    soft: object  # labels (n,) -> soft bits (K,)
    cost: dict


def issue_a(reg: Registry, m: Master, plan, args) -> list[Copy]:
    """Design A: the scheme's own closed-form edit (`BlackBox.issuer(...).embed`) on an eval-mode copy of
    the master, then the self-check `issue` makes (the copy must name its buyer from top-1 labels,
    `query_target` with the buyer pending). Not through `api.issue` itself: with the black-box scheme
    alone it edits a module still in train mode (see `library_issue`). IDs are reserved in the
    registry (kept in `args.pending`, released at the end) so `wmtrace.query` can name them."""
    key, spec, cfg = reg.key(m.name), m.config.code, m.config.schemes["blackbox"]
    marker = schemes.get("blackbox").issuer(None, m, cfg, key, reg.stored(m))
    args.pending = reg.reserve(m.name, [None] * args.buyers)
    out = []
    for b in args.pending:
        t0 = time.perf_counter()
        model = load(m.weights)
        bits = codes.codeword(key, m.name, b.id, spec)
        marker.embed(model, bits, b.id, None)
        check = query_target(ModuleTarget(model, f"A-{b.id}", reveal="top1"), reg, MASTER, pending=args.pending)
        cost = {"seconds": time.perf_counter() - t0, "steps": 0, "compute_fraction": 0.0,
                "all_triggers": check.verdict == "identified" and check.buyer["id"] == b.id}

        def soft(labels: np.ndarray) -> np.ndarray:
            return plan.read(Answers(labels=labels), "top1")

        out.append(Copy("A", b.id, model, bits, plan.inputs[:K], soft, cost))
    return out


def library_issue(reg: Registry, m: Master, plan, test, master_pred) -> str:
    """One buyer through `api.issue` as a user would call it, to record what it gives today."""
    try:
        [b] = api.issue(reg, buyers=1, out=Path(m.weights).parent / "copies", master=MASTER, eval_samples=0)
    except Exception as e:  # SelfCheckFailed: the bug this records
        return f"api.issue failed: {type(e).__name__}: {e}"
    model = load(b.file)
    labels = answered(model, torch.from_numpy(plan.inputs[:K]))
    soft = plan.read(Answers(labels=labels), "top1")
    want = 2.0 * codes.codeword(reg.key(m.name), m.name, b.id, m.config.code) - 1.0
    wrong = int(np.sum(np.sign(soft) == -want))
    agree = float((fidelity.predictions(model, test[0]) == master_pred).float().mean())
    return f"api.issue: agreement {agree:.4f}, {wrong} wrong and {int(np.isnan(soft).sum())} missing top-1 bits"


def issue_b(reg: Registry, m: Master, master: torch.nn.Module, kind: str, train, args) -> list[Copy]:
    """Design B: one fine-tuning run per buyer (`train_b`); copies saved for bench_blackbox_stealth.py."""
    key, spec = reg.key(m.name), m.config.code
    trig = make_triggers(key, kind, train[0])
    out = []
    for i in range(args.buyers):
        buyer = B_IDS + i
        bits = codes.codeword(key, m.name, buyer, spec)
        r = train_b(master, trig, bits, train, args, seed=buyer)
        model = r.pop("model")
        formats.save_safetensors(state_of(model), args.work / "copies" / f"B-{kind}-{buyer}.safetensors")
        out.append(Copy(f"B-{kind}", buyer, model, bits, trig.inputs(), trig.soft, r))
        print(f"B-{kind} buyer {buyer}: {r}", flush=True)
    return out


def reading(c: Copy, model: torch.nn.Module, words: np.ndarray, spec: codes.CodeSpec) -> dict:
    """How `model` (the copy, or an attacked copy) names c's buyer from top-1 labels: the true buyer's
    score z after n queries against the 1e-6 threshold among 50 buyers (row 0 of `words` is the true
    codeword, the rest innocents), the first n where it names the buyer alone, and the bits at n = K."""
    labels = answered(model, torch.from_numpy(c.inputs))
    thr = accuse.threshold(POPULATION, BOUND)
    needed = None
    for n in range(1, K + 1):
        z = accuse.scores(c.soft(labels[:n]), words, spec)
        if z[0] >= thr and z[0] >= z[1:].max():
            needed = n
            break
    soft = c.soft(labels)
    z = accuse.scores(soft, words, spec)
    known = ~np.isnan(soft)
    right = np.sign(soft[known]) == (2.0 * c.bits[known] - 1.0)
    return {"queries_needed": needed, "z": float(z[0]), "innocent_max_z": float(z[1:].max()), "threshold": thr,
            "bits_right": float(right.sum() / K), "bits_missing": float(1 - known.mean())}


def library_query(reg: Registry, model: torch.nn.Module, c: Copy, reveal: str, pending) -> str:
    """`wmtrace.query`'s session (without its audit entry) on design A's copy, A's buyers pending as
    issued (B is not a registered scheme): verdict, named buyer, queries."""
    r = query_target(ModuleTarget(model, f"A-{c.buyer}", reveal=reveal), reg, MASTER, pending=pending)
    who = "right buyer" if r.buyer and r.buyer["id"] == c.buyer else (r.buyer["name"] if r.buyer else "-")
    return f"{r.verdict} ({who}, {r.queries} queries)"


def attacked(c: Copy, args) -> dict[str, tuple[torch.nn.Module, dict]]:
    """The copy after each attack (`wmtrace.attacks`), with what the attack reports."""
    trainer = Trainer(example.build, example.dataset, seed=c.buyer)
    state = state_of(c.model)
    out: dict[str, tuple[torch.nn.Module, dict]] = {}
    t0 = time.perf_counter()
    out[f"finetune {args.finetune_epochs:g} ep"] = (
        example.build_like(finetune(state, args.finetune_epochs, trainer)), {"seconds": time.perf_counter() - t0})
    t0, rep = time.perf_counter(), {}
    out[f"distill {args.distill_epochs:g} ep"] = (
        example.build_like(distill(state, args.distill_epochs, trainer, report=rep)), rep)
    rep["seconds"] = time.perf_counter() - t0
    return out


def fidelity_row(c: Copy, test: tuple[torch.Tensor, torch.Tensor], master_pred: torch.Tensor) -> dict:
    pred = fidelity.predictions(c.model, test[0])
    return {"design": c.design, "buyer": c.buyer, "agreement": float((pred == master_pred).float().mean()),
            "accuracy": float((pred == test[1]).float().mean()), **c.cost}


def measure(reg: Registry, m: Master, copies: list[Copy], test, master_pred, args) -> tuple[list, list]:
    """Per copy: fidelity, cost and the top-1 reading; per attacked copy: the reading after each attack."""
    key, spec = reg.key(m.name), m.config.code
    rows, robust = [], []
    for c in copies:
        words = codes.codewords(key, m.name, [c.buyer, *INNOCENT_IDS], spec)
        row = fidelity_row(c, test, master_pred) | reading(c, c.model, words, spec)
        if c.design == "A":
            row["library_top1"] = library_query(reg, c.model, c, "top1", args.pending)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for design in dict.fromkeys(c.design for c in copies):
        for c in [c for c in copies if c.design == design][: args.attack_buyers]:
            words = codes.codewords(key, m.name, [c.buyer, *INNOCENT_IDS], spec)
            for attack, (model, rep) in attacked(c, args).items():
                pred = fidelity.predictions(model, test[0])
                row = {"design": design, "buyer": c.buyer, "attack": attack, "attack_seconds": rep["seconds"],
                       "agreement_with_master": float((pred == master_pred).float().mean()),
                       "accuracy": float((pred == test[1]).float().mean())} | reading(c, model, words, spec)
                if design == "A":
                    row["library_top1"] = library_query(reg, model, c, "top1", args.pending)
                    row["library_scores"] = library_query(reg, model, c, "scores", args.pending)
                robust.append(row)
                print(json.dumps(row), flush=True)
    return rows, robust


def _mean(rows: list[dict], k: str, fmt: str = "{:.4f}") -> str:
    v = [r[k] for r in rows]
    return f"{fmt.format(np.mean(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})" if len(v) > 1 else fmt.format(v[0])


def _needed(rows: list[dict]) -> str:
    v = [r["queries_needed"] for r in rows]
    got = [x for x in v if x is not None]
    text = f"{np.mean(got):.0f} ({min(got)}-{max(got)})" if got else "-"
    return text + (f", {len(v) - len(got)} never" if len(got) < len(v) else "")


def markdown(rows: list[dict], robust: list[dict], info: dict, command: str, master: dict) -> str:
    """The results file: summary per design, robustness per attacked copy, the command and machine."""
    thr = accuse.threshold(POPULATION, BOUND)
    out = ["# Black-box designs: A (boundary queries + closed-form head edit) vs B (Zhang et al. triggers, "
           "fine-tuned per buyer)", "", f"Command: `{command}`", "",
           f"Machine: {info['machine']} (2-core CPU, shared with other jobs; no GPU), torch {info['torch']}, "
           f"date {info['date']}. Master: the example Fashion-MNIST CNN, 2 epochs x 937 steps of batch 64, "
           f"test accuracy {master['accuracy']:.4f}.", "",
           f"Reading: top-1 labels of the 256 queries/triggers, ID bits queried last; z = score of the true "
           f"codeword among {POPULATION} buyers (`accuse.scores`), threshold for a {BOUND:g} bound "
           f"`accuse.threshold({POPULATION}, {BOUND:g})` = {thr:.2f}. Queries needed = first n at which the "
           "true buyer clears it and outscores the 49 innocents. Mean (min-max) over buyers.", "",
           "| design | buyers | agreement with master | test accuracy | issue s/buyer | training steps/buyer | "
           "fraction of master training | all triggers answer | queries needed | z at 256 | max innocent z |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in dict.fromkeys(r["design"] for r in rows):
        rs = [r for r in rows if r["design"] == d]
        out.append(f"| {d} | {len(rs)} | {_mean(rs, 'agreement')} | {_mean(rs, 'accuracy')} | "
                   f"{_mean(rs, 'seconds', '{:.1f}')} | {_mean(rs, 'steps', '{:.0f}')} | "
                   f"{_mean(rs, 'compute_fraction', '{:.3f}')} | {sum(r['all_triggers'] for r in rs)}/{len(rs)} | "
                   f"{_needed(rs)} | {_mean(rs, 'z', '{:.2f}')} | {max(r['innocent_max_z'] for r in rs):.2f} |")
    lib = [r["library_top1"] for r in rows if "library_top1" in r]
    out += ["", f"`wmtrace.query` (top-1) on design A's copies: {'; '.join(lib)}.", "",
            f"One more buyer through `api.issue` itself (black-box scheme alone): {master['library_issue']}.", "",
            "## Robustness of the top-1 reading", "",
            "| design | buyer | attack | attack s | agreement with master | accuracy | bits right | bits missing "
            "| z at 256 | queries needed | `wmtrace.query` top-1 | `wmtrace.query` scores |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in robust:
        out.append(f"| {r['design']} | {r['buyer']} | {r['attack']} | {r['attack_seconds']:.0f} | "
                   f"{r['agreement_with_master']:.4f} | {r['accuracy']:.4f} | {r['bits_right']:.3f} | "
                   f"{r['bits_missing']:.3f} | {r['z']:.2f} | {r['queries_needed'] or 'never'} | "
                   f"{r.get('library_top1', '-')} | {r.get('library_scores', '-')} |")
    out += ["", "Per copy (JSON lines):", "", "```", *[json.dumps(r) for r in rows + robust], "```", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trained", type=Path, default=None, help="an already trained example master (safetensors)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wmtrace-bb-bench"), help="registry and copies (reused)")
    ap.add_argument("--buyers", type=int, default=5, help="buyers per design")
    ap.add_argument("--attack-buyers", type=int, default=2, help="copies per design that are attacked")
    ap.add_argument("--kinds", default="noise", help="design B trigger kinds, comma-separated: noise,content")
    ap.add_argument("--b-lr", type=float, default=0.01)
    ap.add_argument("--b-mix", type=int, default=16, help="triggers added to each batch of 64 training images")
    ap.add_argument("--b-max-steps", type=int, default=2000)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=float, default=1.0)
    ap.add_argument("--distill-epochs", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/blackbox_designs.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    (args.work / "copies").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    reg, m = setup(args.work, args.trained)
    master = load(m.weights)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    master_pred = fidelity.predictions(master, test[0])
    plan = schemes.get("blackbox").plan(master, m.config.schemes["blackbox"], reg.key(m.name), reg.stored(m))
    note = library_issue(reg, m, plan, test, master_pred)
    print(note, flush=True)
    try:
        copies = issue_a(reg, m, plan, args)
        for kind in args.kinds.split(","):
            copies += issue_b(reg, m, master, kind, train, args)
        rows, robust = measure(reg, m, copies, test, master_pred, args)
    finally:
        reg.release(m.name, [b.id for b in getattr(args, "pending", [])])
    command = "python benchmarks/bench_blackbox_designs.py " + " ".join(sys.argv[1:])
    info = run_info()
    info["machine"] += f", {time.perf_counter() - t_start:.0f} s for the whole run"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    accuracy = float((master_pred == test[1]).float().mean())
    args.out.write_text(markdown(rows, robust, info, command, {"accuracy": accuracy, "library_issue": note}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
