"""A few crops of the vision example's photographs, so its end-to-end test runs in about a minute."""

from wmtrace import vision

COUNTS = {"train": 96, "test": 64}


def dataset(split: str) -> vision.Crops:
    return vision.Crops(split, COUNTS[split])
