"""The fine-tuning frontier on all-MiniLM-L6-v2: unsupervised SimCSE with the optimizers and rates
people use for sentence-transformers (AdamW at 2e-5 to 1e-4) and higher, against the verdict.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune_minilm.py [--workers 2] [--settings 0,2]

`api.init` (the default fidelity target) and `api.issue` of two buyers, then each setting of `GRID` is
one SimCSE run (`bench_minilm.finetune`, batch 32) on buyer 1's copy with snapshots at its step counts
(a step is 2-4 s on one core: the grid is short). At each: the tuned encoder's mean cosine to the
master's embeddings and top-1 retrieval agreement with the master, on 512 held-out fortunes, next to the
copy's own (the budget: within 0.01 of the copy's cosine, 1 point of its retrieval agreement); the
verdict; the leaker's score against the one the bound needs.
Writes benchmarks/results/finetune_minilm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402
import bench_minilm  # noqa: E402

from wmtrace import api, fidelity, minilm  # noqa: E402

# (optimizer, lr, weight decay (None: the optimizer's usual), last layers (0: all), steps of batch 32)
GRID = [
    ("adamw", 2e-5, None, 0, [5, 10, 20, 50]),  # a typical rate; the first steps are the only ones in budget
    ("adamw", 1e-4, None, 0, [10, 50]),
    ("adamw", 5e-4, 0.1, 0, [10, 50]),
    ("adamw", 5e-4, None, 2, [50]),
]
TEXTS = 512


def setting_name(s: tuple) -> str:
    opt, lr, wd, last, _ = s
    return f"{opt} lr {lr:g}" + ("" if wd is None else f" wd {wd:g}") + (f" last {last}" if last else "")


def _embeddings(state: dict[str, torch.Tensor], texts: dict) -> torch.Tensor:
    model = minilm.build()
    model.load_state_dict(state, strict=False)
    return fidelity.outputs(model.eval(), texts)


def run_setting(registry: str, leaker: int, setting: tuple) -> list[dict]:
    torch.set_num_threads(1)
    opt, lr, wd, last, steps = setting
    reg = api.open_registry(registry)
    m = reg.master("minilm")
    b = next(x for x in reg.buyers(m.name) if x.id == leaker)
    ds = minilm.dataset("test")
    texts = {"input_ids": ds.input_ids[:TEXTS], "attention_mask": ds.attention_mask[:TEXTS]}
    reference = _embeddings(load_file(str(m.weights)), texts)
    state = load_file(b.file)
    copy_cos, copy_agree = fidelity.embedding_fidelity(_embeddings(state, texts), reference)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def snap(step: int, whole) -> None:
        if step not in steps:
            return
        s = whole()
        tensors = {k: v.numpy() for k, v in s.items()}
        cos, agree = fidelity.embedding_fidelity(_embeddings(s, texts), reference)
        rows.append({
            "setting": setting_name(setting), "optimizer": opt, "lr": lr, "weight_decay": wd, "last": last,
            "steps": step, "cosine": round(cos, 6), "copy_cosine": round(copy_cos, 6),
            "retrieval_agreement": round(agree, 4), "copy_retrieval_agreement": round(copy_agree, 4),
            "in_budget": copy_cos - cos <= 0.01 and copy_agree - agree <= 0.01,
            **_common.verdict_row(reg, m, tensors, leaker), "seconds": round(time.perf_counter() - t0, 1),
        })
        print(json.dumps(rows[-1]), flush=True)

    bench_minilm.finetune(state, max(steps), lr, optimizer=opt, weight_decay=wd, last=last, callback=snap)
    reg.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", type=Path, help="a registry holding master 'minilm' and buyers (else a new one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--settings", help="indices into GRID, e.g. 0,3 (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_minilm.json"))
    args = ap.parse_args()
    todo = [GRID[int(i)] for i in args.settings.split(",")] if args.settings else GRID
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        if "minilm" not in [m.name for m in reg.masters()]:
            api.init(reg, "minilm", minilm.weights(), bench_minilm.FACTORY, bench_minilm.DATA, output="embedding",
                     strength=minilm.STRENGTH)
            api.issue(reg, buyers=2, out=Path(tmp) / "buyers")
        root = str(reg.root)
        reg.close()
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_setting, [root] * len(todo), [1] * len(todo), todo))
    rows = [r for rs in results for r in rs]
    info = _common.run_info() | {"workers": args.workers, "threads_per_worker": 1, "texts": TEXTS,
                                 "seconds": round(time.time() - t0, 1)}
    _common.write_json(args.out, {"info": info, "rows": rows})
    print(f"{len(rows)} snapshots, wrong buyer named: {sum(r['wrong_buyer'] for r in rows)}; "
          f"in budget and not named: {sum(r['in_budget'] and not r['right'] for r in rows)}")


if __name__ == "__main__":
    main()
