"""The denoiser example's data, fewer of them: its tests register it in seconds, not minutes (the
white-box scheme streams every training input for its placement moments)."""

from wmtrace import denoise


def dataset(split: str):
    return denoise.Pairs(split, count=256 if split == "train" else 16, clean=False)
