"""Which closed-form placement keeps a copy closest to its master, and is repair still worth it?

Same master, same buyers, every variant: the bits read from signed means of the filters (the default)
or from the plain filter mean (Uchida et al.); minimal-norm placement (the regularizer's optimum in
weight space) against activation-aware placement (least change of the carrier's outputs on real
inputs) at several ridges and strengths, and with a short distillation repair. Fidelity on all
10,000 test images.

    python benchmarks/bench_placement.py --master MASTER.safetensors --out benchmarks/results/placement.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

from wmtrace import api, fidelity, modelio
from wmtrace.coding import codes
from wmtrace.data import load_fashion_mnist  # noqa: E402
from wmtrace.schemes.whitebox import (
    Config,  # noqa: E402
    embed,
)
from wmtrace.schemes.whitebox.carriers import embedding_map

VARIANTS = [  # (placement, ridge, repair steps, strength), each with signed and plain-mean statistics
    ("minimal-norm", 0.0, 0, 0.2),
    ("activation", 0.01, 0, 0.2),
    ("activation", 0.1, 0, 0.1),
    ("activation", 0.1, 0, 0.2),
    ("activation", 0.3, 0, 0.2),
    ("activation", 0.1, 20, 0.2),
    ("activation", 0.1, 0, 0.3),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--master", type=Path, required=True, help="a trained example master (safetensors)")
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/placement.json"))
    args = ap.parse_args()

    x_test, y_test = load_fashion_mnist("test")
    train = modelio.import_object(api.EXAMPLE_DATA)("train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reg = api.open_registry(Path(tmp) / "registry", create=True)
        m = api.init(reg, "m", args.master, api.EXAMPLE_FACTORY, api.EXAMPLE_DATA)
        key, spec = reg.key("m"), m.config.code
        signed = list(Config.of(m).carriers)
        master = modelio.build_model(m)
        master_pred = fidelity.predictions(master, x_test)
        master_acc = float((master_pred == y_test).float().mean())
        state = master.state_dict()
        moment_inputs = modelio.tensors(train, embed.EmbedConfig.moment_samples)[0]

        for (placement, ridge, steps, strength), statistic in [(v, s) for v in VARIANTS for s in ("signed", "mean")]:
            carriers = [dataclasses.replace(c, signed=statistic == "signed") for c in signed]
            xs = [c.secret(key) for c in carriers]
            scaled = [embed.margin(state[c.name], c, strength) for c in carriers]
            if placement == "activation":
                metrics = embed.input_moments(master, carriers, moment_inputs, ridge)
            else:
                metrics = [None] * len(carriers)
            maps = [embedding_map(x, mt) for x, mt in zip(xs, metrics, strict=True)]
            agree, acc, change = [], [], []
            for bid in range(1, args.buyers + 1):
                bits = codes.codeword(key, "m", bid, spec)
                placed = {k: v.clone() for k, v in state.items()}
                embed.place(placed, carriers, xs, scaled, bits, maps=maps)
                model = modelio.build_model(m)
                model.load_state_dict(placed)
                if steps:
                    cfg = embed.EmbedConfig(steps=steps)
                    data = modelio.shuffled_batches(train, cfg.batch_size, bid)
                    embed.repair(model, master, data, carriers, xs, scaled, bits, cfg)
                pred = fidelity.predictions(model, x_test)
                agree.append(float((pred == master_pred).float().mean()))
                acc.append(float((pred == y_test).float().mean()))
                sd = model.state_dict()
                change.append(float(np.mean([float((sd[c.name] - state[c.name]).norm() / state[c.name].norm())
                                             for c in carriers])))
            row = {"statistic": statistic, "placement": placement, "ridge": ridge, "repair_steps": steps,
                   "strength": strength,
                   "agreement_mean": float(np.mean(agree)), "agreement_min": min(agree),
                   "accuracy_change_points": 100 * (float(np.mean(acc)) - master_acc),
                   "relative_weight_change": float(np.mean(change))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.out, {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                          "master_accuracy": master_acc, "rows": rows})


if __name__ == "__main__":
    main()
