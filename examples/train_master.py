"""Train the example master on Fashion-MNIST and save it as safetensors.

    python examples/train_master.py --out examples/master/fashion_cnn.safetensors --epochs 2
"""

import argparse
import sys

from wmtrace import example
from wmtrace.errors import WmtraceError


def show_progress(step: int, total: int) -> None:
    if step % 50 == 0 or step == total:
        print(f"\rstep {step}/{total}", end="\n" if step == total else "", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/master/fashion_cnn.safetensors")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    args = ap.parse_args()
    try:
        metrics = example.train_master(
            args.out, epochs=args.epochs, limit=args.limit, seed=args.seed, data_dir=args.data, progress=show_progress
        )
    except WmtraceError as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: test accuracy {metrics['test_accuracy']:.2%} after {metrics['steps']} steps "
          f"in {metrics['seconds']:.0f} s")


if __name__ == "__main__":
    main()
