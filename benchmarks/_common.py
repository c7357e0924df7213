"""What several benchmarks share: the example master in a registry, its accuracy, soft bits read the
way `trace` reads them, the paper's slow issuing (the baseline), timing and writing results.

Benchmarks run as scripts (`python benchmarks/bench_x.py`), so this folder is on `sys.path` and they
import this module as `_common`.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wmtrace import api, example, fidelity, modelio
from wmtrace.coding import codes
from wmtrace.pipeline.trace import TraceResult
from wmtrace.registry import Master, Registry
from wmtrace.schemes.whitebox import Config
from wmtrace.schemes.whitebox.align import locate
from wmtrace.schemes.whitebox.extract import extract, master_arrays


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_json(path: Path, data: object, indent: int = 2, newline: bool = False) -> None:
    """Write a result file, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + ("\n" if newline else ""))


def run_info() -> dict:
    """Where and when a result was measured: the head of a result file."""
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def named(r: TraceResult) -> set[int]:
    """Buyer IDs a trace accuses: the decoded buyer, else every colluder (by score; also a single leaker
    too weakly marked to decode)."""
    return {r.buyer["id"]} if r.buyer else {c["id"] for c in r.colluders}


def example_master(reg: Registry, trained: Path | None = None, epochs: int = 2) -> Master:
    """The example master registered in `reg` (`api.ensure_example`); `trained`, an already trained
    example master's safetensors, is used instead of training one."""
    if trained is not None:
        cached = reg.cache_path(f"{api.EXAMPLE_MASTER}.safetensors")
        if not cached.exists():
            cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copy(trained, cached)
    return api.ensure_example(reg, epochs=epochs)


def example_buyers(reg: Registry, out: Path, count: int = 3) -> tuple[Master, list]:
    """The example master in `reg` with at least `count` issued buyers (issued into `out` if missing)."""
    m = api.ensure_example(reg)
    buyers = [b for b in reg.buyers(m.name) if b.status == "issued"]
    if len(buyers) < count:
        buyers += api.issue(reg, buyers=count - len(buyers), out=out)
    return m, buyers


def example_accuracy(state: dict[str, torch.Tensor], inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Test accuracy of the example CNN holding `state` (reshaped copies too; integer buffers optional)."""
    return fidelity.evaluate(example.build_like(state), inputs, labels)


class SoftBits:
    """A master's white-box soft bits read from weights as `trace` does: carriers located, then the fit.

    `metrics=False` fits without the stored placement metric (the minimal-norm basis): how the
    collusion and issue-robustness figures in BENCHMARKS.md were read."""

    def __init__(self, reg: Registry, m: Master, metrics: bool = True) -> None:
        self.key, self.spec, self.cfg = reg.key(m.name), m.config.code, Config.of(m)
        self.carriers = list(self.cfg.carriers)
        self.arrays = master_arrays(m, [c.name for c in self.carriers])
        self.metrics = reg.stored(m) if metrics else None

    def __call__(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        found = locate(tensors, self.arrays, self.carriers)
        return extract(found, self.arrays, self.key, self.cfg, self.spec.bits, self.metrics)


def naive_buyer(reg: Registry, m: Master, buyer_id: int, train, held_out, lr: float, max_steps: int,
                keep_state: bool = False):
    """The paper's regularizer, fine-tune-to-embed (SGD on the task loss plus 0.01 * BCE(sigmoid(X w), b)
    on the raw filter mean), until every bit has the right sign; with `keep_state`, (figures, the
    copy's state dict)."""
    key = reg.key(m.name)
    spec = m.config.code
    bits = torch.from_numpy(codes.codeword(key, m.name, buyer_id, spec).astype(np.float32))
    carriers = list(Config.of(m).carriers)
    xs = [torch.from_numpy(c.projection(key)).float() for c in carriers]
    master = modelio.build_model(m)
    model = modelio.build_model(m)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = train
    g = torch.Generator().manual_seed(buyer_id)
    t0, step = time.perf_counter(), 0
    while step < max_steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            j = perm[i : i + 64]
            model.train()
            loss = F.cross_entropy(model(x[j]), y[j])
            reg_loss = 0.0
            correct = True
            for c, xm in zip(carriers, xs, strict=True):
                w = params[c.name].reshape(c.rows, -1).mean(0)
                z = xm @ w
                target = bits[c.start : c.start + c.bits]
                reg_loss = reg_loss + F.binary_cross_entropy_with_logits(z, target, reduction="sum")
                correct &= bool(((z > 0).float() == target).all())
            if correct:
                break
            opt.zero_grad(set_to_none=True)
            (loss + 0.01 * reg_loss).backward()
            opt.step()
            step += 1
        else:
            continue
        break
    seconds = time.perf_counter() - t0
    inputs, labels = held_out
    figures = {
        "steps": step,
        "seconds": seconds,
        "samples": step * 64,
        "agreement": fidelity.agreement(model, master, inputs),
        "accuracy": fidelity.evaluate(model, inputs, labels),
        "all_bits_embedded": step < max_steps,
    }
    if keep_state:
        return figures, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return figures


def verdict_row(reg: Registry, m: Master, tensors: dict[str, np.ndarray], leaker: int) -> dict:
    """What a fine-tuning benchmark records of one snapshot: the verdict `trace` gives, who was named,
    and the evidence left: the leaker's score, the highest innocent's and the score the bound (1e-6)
    needs, with the soft bits read as `trace` reads them (every scheme located, extracted, combined)."""
    from wmtrace import schemes
    from wmtrace.coding import accuse
    from wmtrace.pipeline.trace import trace_tensors

    key, spec = reg.key(m.name), m.config.code
    ids = sorted(b.id for b in reg.buyers(m.name) if b.status == "issued")
    r = trace_tensors(tensors, reg, "snapshot")
    who = named(r)
    located = {n: schemes.get(n).locate(tensors, m, c) for n, c in m.config.schemes.items()}
    soft = accuse.combine([schemes.get(n).extract(loc, m, m.config.schemes[n], key, spec.bits, reg.stored(m))
                           for n, loc in located.items() if loc is not None])
    z = accuse.scores(soft, codes.codewords(key, m.name, ids, spec), spec)
    return {
        "verdict": r.verdict, "named": sorted(who), "right": who == {leaker}, "wrong_buyer": bool(who - {leaker}),
        "bit_errors": r.bit_errors, "z_buyer": round(float(z[ids.index(leaker)]), 2),
        "z_innocent_max": round(float(np.delete(z, ids.index(leaker)).max()), 2) if len(ids) > 1 else None,
        "z_needed": round(accuse.threshold(len(ids), 1e-6), 2),
        "carriers": [{k: c[k] for k in ("carrier", "similarity", "found_by")} for c in r.carriers],
    }
