"""Why a 1000-class model pays more for the same mark: the data, or the placement?

    OMP_NUM_THREADS=2 python benchmarks/bench_vision_placement.py [--strengths 0.1,0.05] [--draws 2]

EfficientNet-Lite0 (`wmtrace.vision`), the carriers `init` chooses for it (whitebox only, bits 256), and
trial copies marked in closed form under a throwaway key, one random codeword per draw. For each
strength: top-1 agreement with the master on 512 `test` crops and 512 `unseen` crops, for placement
metrics estimated (a) from 1,024 training crops (what `init` does), (b) from the training crops and
the test crops together (more varied photographs), (c) from the very test crops measured (an oracle
no seller has), (d) none (minimal norm). And the floor: the master rounded to fp16 and to int8 per
channel, split by the master's confidence. Writes benchmarks/results/vision_placement.json.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from wmtrace import attacks, fidelity, formats, modelio, vision  # noqa: E402
from wmtrace.coding import keys  # noqa: E402
from wmtrace.schemes import MasterModel  # noqa: E402
from wmtrace.schemes.whitebox import WhiteBox, carriers, embed  # noqa: E402
from wmtrace.schemes.whitebox.scheme import Config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strengths", default="0.1,0.05")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vision_placement.json"))
    args = ap.parse_args()
    model = vision.build()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(vision.weights()).items()},
                          strict=False)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train, test, unseen = vision.Crops("train"), vision.Crops("test"), vision.Crops("unseen")
    probe = modelio.tensors(train, 64)[0]
    options = {"carriers": None, "layers": None, "strength": 0.2, "steps": 0, "placement": "activation",
               "output": "logits", "loss": None, "fidelity": 0}
    chosen = Config.from_dict(WhiteBox().prepare(MasterModel(model, state, train, probe), 256, options)[0]).carriers
    chosen = list(chosen)
    stream = lambda ds, n=None: (x for x, _ in modelio.stream(ds, n))  # noqa: E731
    raw = {"train": embed.input_moments(model, chosen, stream(train, 1024), 0.1),
           "train+test": embed.input_moments(model, chosen, itertools.chain(stream(train, 1024), stream(test)), 0.1),
           "oracle (the test crops)": embed.input_moments(model, chosen, stream(test), 0.1),
           "minimal norm": [None] * len(chosen)}
    evals = {"test": test, "unseen": unseen}
    ref = {s: fidelity.stream_outputs(model, modelio.stream(d))[0] for s, d in evals.items()}

    def agreement(st: dict) -> dict:
        model.load_state_dict(st)
        out = {}
        for s, d in evals.items():
            ours = fidelity.stream_outputs(model, modelio.stream(d))[0]
            same, sure = ours.argmax(1) == ref[s].argmax(1), ref[s].softmax(1).max(1).values >= 0.5
            share = lambda m: round(float(m.float().mean()), 4)  # noqa: E731
            out[s] = {"all": share(same), "confident": share(same[sure]), "unsure": share(same[~sure])}
        return out

    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, no GPU",
               "date": time.strftime("%Y-%m-%d"), "carriers": [c.name for c in chosen],
               "confident_share": {s: round(float((r.softmax(1).max(1).values >= 0.5).float().mean()), 3)
                                   for s, r in ref.items()},
               "floor": {q: agreement(attacks.dequantize(attacks.quantize(state, q)) | {
                   k: v for k, v in state.items() if not v.is_floating_point()}) for q in ("fp16", "int8-channel")},
               "rows": []}
    print(results["floor"], flush=True)
    key = keys.generate()
    secrets = [c.secret(key) for c in chosen]
    for strength in (float(s) for s in args.strengths.split(",")):
        margins = [embed.margin(state[c.name], c, strength) for c in chosen]
        for draw in range(args.draws):
            bits = np.random.default_rng(draw).integers(0, 2, 256).astype(np.float64)
            for name, metrics in raw.items():
                maps = [carriers.embedding_map(s, mt) for s, mt in zip(secrets, metrics, strict=True)]
                st = dict(state)
                embed.place(st, chosen, secrets, margins, bits, maps=maps)
                results["rows"].append({"strength": strength, "draw": draw, "metric": name, **agreement(st)})
                print(results["rows"][-1], flush=True)
                write_json(args.out, results)
    model.load_state_dict(state)


if __name__ == "__main__":
    main()
