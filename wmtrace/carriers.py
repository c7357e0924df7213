"""Which weight tensors carry the mark, and the statistic the mark lives in.

As in Uchida et al., a carrier's statistic is the mean of its filters (rows of a Linear weight),
a vector of length in_channels * kernel area; bits are signs of secret random projections of it.
We embed in the statistic's difference to the master, which the seller keeps: the projections of
any model not derived from a buyer copy are then fair coins, whatever that model is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import keys
from .errors import BadInput

# A carrier needs several times more statistic dimensions than bits for a minimal-norm,
# low-distortion solution; below this ratio the constraints nearly pin the statistic down.
MIN_DIMS_PER_BIT = 2


@dataclass(frozen=True)
class Carrier:
    name: str
    shape: tuple[int, ...]
    start: int  # first codeword bit carried here
    bits: int

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return math.prod(self.shape[1:])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Carrier:
        return cls(d["name"], tuple(d["shape"]), int(d["start"]), int(d["bits"]))

    def projection(self, key: bytes) -> np.ndarray:
        """The secret matrix X (bits x dim). Keyed by bit range, not name: names change on export."""
        return keys.projection(key, f"carrier/{self.start}/{self.bits}/{self.dim}", self.bits, self.dim)


def _eligible(name: str, t: torch.Tensor) -> bool:
    # Conv filters with more than one input channel (the first conv sees raw pixels and is small),
    # or Linear weights; never embeddings or normalisation parameters (1-D).
    if not t.is_floating_point():
        return False
    if t.dim() == 4:
        return t.shape[1] > 3 or t.shape[1] * t.shape[2] * t.shape[3] >= 64
    return False


def select(
    state: dict[str, torch.Tensor], total_bits: int, names: list[str] | None = None, count: int = 2
) -> list[Carrier]:
    """Carriers spread over `count` layers, the largest statistics first; bits split in whole bytes
    so a layer lost whole costs whole Reed-Solomon symbols."""
    if names:
        missing = [n for n in names if n not in state]
        if missing:
            raise BadInput(f"carrier layer {missing[0]!r} is not in the master's weights")
        chosen = list(names)
    else:
        eligible = [(n, t) for n, t in state.items() if _eligible(n, t)]
        eligible.sort(key=lambda nt: math.prod(nt[1].shape[1:]), reverse=True)
        chosen = [n for n, _ in eligible[:count]]
        if not chosen:
            raise BadInput("no convolution layer in the master can carry a watermark; name carriers")
        order = list(state)
        chosen.sort(key=order.index)
    symbols = total_bits // 8
    per, extra = divmod(symbols, len(chosen))
    carriers, start = [], 0
    for i, name in enumerate(chosen):
        shape = tuple(state[name].shape)
        bits = 8 * (per + (1 if i < extra else 0))
        c = Carrier(name, shape, start, bits)
        if len(shape) < 2 or c.dim < MIN_DIMS_PER_BIT * bits:
            raise BadInput(
                f"layer {name!r} (statistic of {c.dim} values) is too small for {bits} bits; "
                "choose larger carrier layers or fewer bits"
            )
        carriers.append(c)
        start += bits
    return carriers


def statistic(weight: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Mean over output filters, flattened: Uchida et al.'s w."""
    return weight.reshape(weight.shape[0], -1).mean(0)


def embedding_map(x: np.ndarray, metric: np.ndarray | None = None) -> np.ndarray:
    """The linear map A (dim x bits) with d = A @ t the change of the statistic that meets
    x @ d = t exactly and is smallest in `metric`; fixed per carrier, so computed once per run.

    With no metric d has minimal norm: the closed-form optimum of the paper's embedding
    constraint. With the carrier's input second moments C as metric, d minimises d' C d, the
    mean squared change of the layer's outputs on real inputs: the mark goes where the data
    barely looks, so the copy needs no fine-tuning to stay faithful.
    """
    x = x.astype(np.float64)
    inv_xt = x.T if metric is None else np.linalg.solve(metric, x.T)
    return inv_xt @ np.linalg.inv(x @ inv_xt)

