"""Trace cost against just loading the file, and the highest pruning rate that still names the buyer.

    python benchmarks/bench_trace.py --out benchmarks/results/trace.json

Uses the example master (trained once into a temporary registry) and one issued buyer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import example_accuracy, named, run_info, timed, write_json  # noqa: E402

from wmtrace import api, attacks, example, formats  # noqa: E402
from wmtrace.data import load_fashion_mnist  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/trace.json"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--registry", type=Path, help="reuse a registry that already has the example master")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(args.registry or Path(tmp) / "registry", create=True)
        m = api.ensure_example(reg)
        (b,) = api.issue(reg, buyers=1, out=Path(tmp) / "out")
        inputs, labels = load_fashion_mnist("test")
        model = example.build()
        model.load_state_dict(load_file(b.file))
        onnx_path = Path(tmp) / "b.onnx"
        formats.export_onnx(model, inputs[:1], onnx_path)

        timings = {}
        for name, path in (("safetensors", b.file), ("onnx", onnx_path)):
            load_s = timed(lambda p=path: formats.load_tensors(p), args.repeat)
            raw_s = timed(lambda p=path: load_file(str(p)), args.repeat) if name == "safetensors" else None
            trace_s = timed(lambda p=path: api.trace(p, reg), args.repeat)
            timings[name] = {"trace_s": trace_s, "load_tensors_s": load_s, "safetensors_load_file_s": raw_s}
        ratio = timings["safetensors"]["trace_s"] / timings["safetensors"]["safetensors_load_file_s"]

        sweep = []
        state = load_file(b.file)
        for amount in [0.5, 0.65, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99]:
            pruned = attacks.prune_global(state, amount)
            path = Path(tmp) / f"pruned-{amount}.safetensors"
            formats.save_safetensors(pruned, path)
            r = api.trace(path, reg)
            accused = named(r)
            sweep.append({
                "pruned": amount,
                "verdict": r.verdict,
                "correct": accused == {b.id},  # by decoding, or by score alone when too weak to decode
                "named": sorted(accused),
                "bit_errors": r.bit_errors,
                "bits_missing": r.bits_missing,
                "accuracy": example_accuracy(pruned, inputs, labels),
            })
        highest = max((s["pruned"] for s in sweep if s["correct"]), default=None)
        wrong = [s for s in sweep if set(s["named"]) - {b.id}]

    result = {
        **run_info(),
        "master_accuracy": m.accuracy,
        "timings": timings,
        "trace_over_load_ratio": ratio,
        "pruning": sweep,
        "highest_pruning_naming_buyer": highest,
        "wrong_accusations": len(wrong),
    }
    write_json(args.out, result)
    print(json.dumps({"trace_over_load_ratio": ratio, "highest_pruning": highest,
                      "accuracy_at": {s["pruned"]: round(s["accuracy"], 4) for s in sweep}}))
    assert np.isfinite(ratio)


if __name__ == "__main__":
    main()
