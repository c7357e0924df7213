"""A distribution pipeline on the Python API: register a master, issue copies, trace a leak.

    python examples/train_master.py
    python examples/pipeline.py --weights examples/master/fashion_cnn.safetensors --buyers 3
"""

import argparse
import tempfile
from pathlib import Path

from wmtrace import api


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--registry", default=None, help="default: a temporary folder")
    args = ap.parse_args()

    root = Path(args.registry or tempfile.mkdtemp(prefix="wmtrace-"))
    reg = api.open_registry(root, create=True)
    if not any(m.name == "fashion" for m in reg.masters()):
        api.init(reg, "fashion", args.weights, "wmtrace.example:build", data="wmtrace.example:dataset")
    issued = api.issue(reg, buyers=args.buyers, out=root / "copies", master="fashion")
    for b in issued:
        print(f"{b.name}: {b.file} agreement={b.agreement:.4f} accuracy={b.accuracy:.4f}")

    leaked = issued[-1].file
    result = api.trace(leaked, reg)
    print(f"trace {leaked}: {result.verdict}, buyer {result.buyer}, "
          f"false-accusation probability <= {result.false_positive_probability:.1e}")


if __name__ == "__main__":
    main()
