"""A small slice of real Fashion-MNIST, so end-to-end tests run in seconds on two cores."""

from torch.utils.data import TensorDataset

from wmtrace.data import load_fashion_mnist

LIMITS = {"train": 6000, "test": 1000}


def dataset(split: str) -> TensorDataset:
    return TensorDataset(*load_fashion_mnist(split, limit=LIMITS[split]))


def unlabeled(split: str) -> TensorDataset:
    return TensorDataset(load_fashion_mnist(split, limit=LIMITS[split])[0])
