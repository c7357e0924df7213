"""Train the example master on Fashion-MNIST and save it as safetensors.

    python examples/train_master.py --out examples/master/fashion_cnn.safetensors --epochs 2
"""

import argparse

from wmtrace import example


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="examples/master/fashion_cnn.safetensors")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    args = ap.parse_args()
    metrics = example.train_master(args.out, epochs=args.epochs, seed=args.seed, data_dir=args.data)
    print(f"{args.out}: test accuracy {metrics['test_accuracy']:.2%} after {metrics['steps']} steps "
          f"in {metrics['seconds']:.0f} s")


if __name__ == "__main__":
    main()
