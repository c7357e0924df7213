"""Black-box tracing through a real endpoint: buyer copies attacked, served by KServe, named by `query`.

    python benchmarks/bench_blackbox_endpoint.py                  # 10 buyers, 2 copies attacked
    python benchmarks/bench_blackbox_endpoint.py --buyers 50      # the headline bound among 50 buyers

The full example master (2 epochs on Fashion-MNIST, trained once and cached under --cache) is
registered with both schemes and N copies are issued (default 10: issuing takes ~10-20 s a copy on
two CPU cores, each copy being marked, traced and queried before it is written, so 50 take 10-15
minutes; the registry in --cache is reused and grown). For `--sample` copies, every attack below is
applied and the result served by one KServe server (OIP v2 on 127.0.0.1, `tests/servers.py`) at
each reveal of `--reveals`, then queried (`api.query`, what `wmtrace query` runs):

  weights  finetune (1 epoch on the attacker's data), prune 30% (global magnitude), int8 (quantize,
           one scale per tensor), onnx (the copy exported to ONNX, served by onnxruntime)
  serving  preprocess (resize to 24 px and back + JPEG 75), top1 (labels only), ensemble of 2 and 3
           copies (mean softmax), screen (random answers to the 5% least confident inputs, calibrated
           on the attacker's 1,000 test images), plus `none`, the copy as issued

Per row: the leaker's accuracy cost (points of test accuracy vs the copy as issued, or vs the mean of
the copies an ensemble serves), computed in-process by the same code the server runs on 2,000 test
images the screen was not calibrated on; the verdict, queries, bound and buyers named; innocents
named (must be 0). Writes a markdown table (--out) headed by the command, machine and date.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))  # tests.servers: the KServe harness the end-to-end tests use
from _common import example_master, named, run_info  # noqa: E402

from tests import servers  # noqa: E402
from tests.served_models import natural_inputs  # noqa: E402
from wmtrace import api, attacks, example, formats, modelio  # noqa: E402
from wmtrace.data import load_fashion_mnist  # noqa: E402

DATA = "wmtrace.example:dataset"
CALIBRATION = 1000  # the attacker's own natural inputs for the screen: the first test images


@dataclass
class Deployment:
    """One leaker's server: copies (files), a serving attack, the buyers whose copies they are."""

    name: str
    kind: str
    files: list[str]
    leakers: list[int]
    attack: str | None = None
    params: dict = field(default_factory=dict)
    reference: float = 0.0  # the accuracy of the copies as issued (mean over an ensemble's)
    accuracy: float = 0.0


def setup(args) -> tuple:
    """The registry in --cache with the example master and at least --buyers issued copies."""
    args.cache.mkdir(parents=True, exist_ok=True)
    trained = args.cache / "master-e2.safetensors"
    if not trained.exists():
        t = time.perf_counter()
        example.train_master(trained, epochs=2)
        print(f"trained the example master in {time.perf_counter() - t:.0f} s", flush=True)
    reg = api.open_registry(args.cache / "registry", create=True)
    m = example_master(reg, trained=trained)
    have = [b for b in reg.buyers(m.name) if b.status == "issued"]
    if len(have) < args.buyers:
        t = time.perf_counter()
        api.issue(reg, buyers=args.buyers - len(have), out=args.cache / "copies", master=m.name)
        print(f"issued {args.buyers - len(have)} copies in {time.perf_counter() - t:.0f} s", flush=True)
    buyers = [b for b in reg.buyers(m.name) if b.status == "issued"]
    return reg, m, buyers


def weight_attacks(copy, work: Path, args) -> list[Deployment]:
    """The copy after each weight attack, as files a server loads."""
    base = f"b{copy.id}"
    rows = []
    attacks = [("finetune", {"strength": args.finetune_epochs}), ("prune", {"strength": 0.3}),
               ("quantize", {"mode": "int8"})]
    attacks += [("finetune", {"strength": args.finetune_epochs, "lr": lr}) for lr in args.finetune_lrs]
    for name, params in attacks:
        tag = "-".join(f"{v:g}" if isinstance(v, float) else v for v in params.values())
        out = work / f"{base}-{name}-{tag}.safetensors"  # the strength in the name: a cache per setting
        if not out.exists():
            t = time.perf_counter()
            api.attack(name, copy.file, out, data=args.attacker_data, **params)
            print(f"  {name} of buyer {copy.id}: {time.perf_counter() - t:.0f} s", flush=True)
        label = {"finetune": f"finetune {args.finetune_epochs:g} epoch, lr {params.get('lr', 0.05):g}",
                 "prune": "prune 30%", "quantize": "int8"}
        rows.append(Deployment(label[name], "weights", [str(out)], [copy.id]))
    onnx = work / f"{base}.onnx"
    if not onnx.exists():
        net = example.build()
        state = {k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(copy.file).items()}
        modelio.load_into(net, state, f"{copy.file}: weights do not fit the example CNN")
        formats.export_onnx(net, torch.zeros(2, 1, 28, 28), onnx)
    rows.append(Deployment("onnx export", "weights", [str(onnx)], [copy.id]))
    return rows


def deployments(buyers, work: Path, args) -> list[Deployment]:
    rows = []
    for copy in buyers[: args.sample]:
        one = [copy.file]
        rows.append(Deployment("none", "-", one, [copy.id]))
        rows += weight_attacks(copy, work, args)
        rows.append(Deployment("preprocess 24px + JPEG 75", "serving", one, [copy.id], "preprocess"))
        rows.append(Deployment("top1", "serving", one, [copy.id], "top1"))
        rows.append(Deployment(f"screen {args.screen_fraction:g}", "serving", one, [copy.id], "screen",
                               {"fraction": args.screen_fraction}))
    for n in (2, 3):
        if len(buyers) >= n:
            group = buyers[:n]
            rows.append(Deployment(f"ensemble of {n}", "serving", [b.file for b in group], [b.id for b in group],
                                   "ensemble"))
    return rows


def measure_accuracy(rows: list[Deployment], buyers, args) -> None:
    """Test accuracy of each deployment's answers (in-process, the server's own code) and of its copies."""
    x, y = load_fashion_mnist("test", limit=CALIBRATION + args.eval)
    x, y = x[CALIBRATION:].numpy(), y[CALIBRATION:].numpy()
    natural = natural_inputs(DATA, "test", CALIBRATION)
    copies = {}
    for b in buyers:
        if any(b.id in r.leakers for r in rows):
            copies[b.id] = float((attacks.file_predict(b.file, api.EXAMPLE_FACTORY)(x).argmax(1) == y).mean())
    for r in rows:
        predict, _ = attacks.served(r.files, api.EXAMPLE_FACTORY, r.attack, r.params,
                                    natural if r.attack == "screen" else None)
        r.accuracy = float((predict(x).argmax(1) == y).mean())
        r.reference = float(np.mean([copies[i] for i in r.leakers]))


def serve_and_query(rows: list[Deployment], reg, args) -> list[dict]:
    """Every deployment at every reveal (the attack's own if it forces one) in one KServe server."""
    models = {}
    for i, r in enumerate(rows):
        forced = attacks.serve_attack(r.attack).reveal if r.attack else None
        for reveal in [forced] if forced else args.reveals:
            models[f"d{i}-{reveal}"] = servers.leak(*r.files, reveal=reveal, attack=r.attack, params=r.params,
                                                    data=DATA if r.attack == "screen" else None, limit=CALIBRATION)
    results = []
    t = time.perf_counter()
    with servers.kserve_server(models) as url:
        print(f"KServe serving {len(models)} models ({time.perf_counter() - t:.0f} s to start)", flush=True)
        for model, (_, spec) in models.items():
            r = rows[int(model[1:].split("-")[0])]
            t = time.perf_counter()
            with api.open_target(f"{url}/v2/models/{model}", reveal=spec["reveal"], classes=10) as target:
                res = api.query(target, reg, budget=args.budget)
            accused = named(res)
            results.append({
                "attack": r.name, "kind": r.kind, "copies": r.leakers, "reveal": spec["reveal"],
                "cost_points": 100 * (r.reference - r.accuracy), "accuracy": r.accuracy, "verdict": res.verdict,
                "named": sorted(accused), "queries": res.queries, "bound": res.false_positive_probability,
                "innocents": len(accused - set(r.leakers)), "seconds": time.perf_counter() - t})
            print(row_text(results[-1]), flush=True)
    return results


def row_text(x: dict) -> str:
    bound = "-" if x["bound"] is None else f"{x['bound']:.1e}"
    copies = ",".join(map(str, x["copies"]))
    named_ = ",".join(map(str, x["named"])) or "-"
    return (f"| {x['attack']} | {x['kind']} | {copies} | {x['reveal']} | {x['cost_points']:+.2f} | {x['verdict']} "
            f"| {named_} | {x['queries']} | {bound} | {x['innocents']} | {x['seconds']:.1f} |")


def write(results: list[dict], buyers: int, args, seconds: float) -> None:
    info = run_info()
    lines = [
        "# Black-box tracing through a KServe endpoint", "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Machine: {info['machine']} (2-core CPU), torch {info['torch']}; date {info['date']}; "
        f"{buyers} buyers issued; {seconds / 60:.1f} min in all.", "",
        f"Cost: points of test accuracy the leaker loses vs the copy as issued ({args.eval} test images; an "
        "ensemble vs the mean of its copies). Bound: the false-accusation probability reported. "
        "Innocents: buyers named whose copies were not served (must be 0).", "",
        "| attack | kind | copies | reveal | cost (points) | verdict | named | queries | bound | innocents | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[row_text(x) for x in results], ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buyers", type=int, default=10, help="copies issued (50 for the headline bound; slow)")
    ap.add_argument("--sample", type=int, default=2, help="copies put through every single-copy attack")
    ap.add_argument("--reveals", default="top1,scores", help="what the servers reveal (attacks forcing one keep it)")
    ap.add_argument("--finetune-epochs", type=float, default=1.0)
    ap.add_argument("--finetune-lrs", type=lambda v: [float(x) for x in v.split(",") if x], default=[0.005, 0.001],
                    help="learning rates of gentler fine-tunes besides the attack's default 0.05")
    ap.add_argument("--attacker-data", default=DATA, help="module:function, the fine-tuning attacker's data")
    ap.add_argument("--screen-fraction", type=float, default=0.05, help="natural inputs the screen answers at random")
    ap.add_argument("--eval", type=int, default=2000, help="test images for the accuracy cost")
    ap.add_argument("--budget", type=int, default=None, help="most queries per session [the plan's own]")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "wmtrace" / "bench_blackbox_endpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "blackbox_endpoint.md")
    args = ap.parse_args()
    args.reveals = args.reveals.split(",")
    torch.set_num_threads(2)
    start = time.perf_counter()
    reg, m, buyers = setup(args)
    work = args.cache / "attacked"
    work.mkdir(exist_ok=True)
    rows = deployments(buyers, work, args)
    measure_accuracy(rows, buyers, args)
    results = serve_and_query(rows, reg, args)
    write(results, len(buyers), args, time.perf_counter() - start)
    bad = [x for x in results if x["innocents"]]
    print(f"wrote {args.out}; innocents named in {len(bad)} of {len(results)} sessions")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
