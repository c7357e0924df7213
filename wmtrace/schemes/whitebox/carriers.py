"""Which weight tensors carry the mark, and the statistic the mark lives in.

In Uchida et al. a carrier's statistic is the mean of its filters (rows of a Linear weight), a
vector of length in_channels * kernel area, and bits are signs of secret random projections of it.
That mark is one shift shared by every filter, and it shows: the filter mean of a marked layer is
far more coherent than in any other layer, and removing the filter mean where the data rarely
looks deletes it at no cost (BENCHMARKS.md, detection). So each bit here reads its own signed mean:
filter i counts with a secret sign s[j, i] in bit j. The mark is then a sum of many keyed rank-one
terms that leaves the filter mean alone; with all signs +1 (`signed=False`, masters registered
before signed carriers) it is the paper's statistic. We embed in the difference to the master,
which the seller keeps: the projections of any model not derived from a buyer copy are then fair
coins, whatever that model is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ...coding import keys
from ...errors import BadInput

# A carrier needs several times more statistic dimensions than bits for a minimal-norm,
# low-distortion solution; below this ratio the constraints nearly pin the statistic down.
MIN_DIMS_PER_BIT = 2


@dataclass(frozen=True)
class Carrier:
    name: str
    shape: tuple[int, ...]
    start: int  # first codeword bit carried here
    bits: int
    signed: bool = False  # keyed signs per filter and bit; False: the plain filter mean

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
        return cls(d["name"], tuple(d["shape"]), int(d["start"]), int(d["bits"]), bool(d.get("signed", False)))

    def projection(self, key: bytes) -> np.ndarray:
        """The secret matrix X (bits x dim). Keyed by bit range, not name: names change on export."""
        return keys.projection(key, f"carrier/{self.start}/{self.bits}/{self.dim}", self.bits, self.dim)

    def secret(self, key: bytes) -> Secret:
        """Everything keyed that reads this carrier's bits."""
        if not self.signed:
            return Secret(self.projection(key), np.ones((self.bits, self.rows)))
        signs = keys.signs(key, f"carrier/{self.start}/{self.bits}/{self.rows}", self.bits, self.rows)
        return Secret(self.projection(key), signs)


@dataclass(frozen=True)
class Secret:
    """Bit j of a carrier reads x[j] @ (mean over filters i of signs[j, i] * filter i)."""

    x: np.ndarray  # bits x dim, standard normal
    signs: np.ndarray  # bits x rows, +-1 (all +1: Uchida et al.'s filter mean)

    def read(self, rows: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Each bit's statistic of `rows` (filters x dim; a difference to the master, say); a
        tensor stays a tensor, differentiable (repair's regularizer)."""
        x, signs = self.x, self.signs
        if isinstance(rows, torch.Tensor):
            x, signs = (torch.from_numpy(a).to(rows.dtype) for a in (x, signs))
        return ((rows @ x.T) * signs.T).mean(0)


# A statistic averages this many rows at least: a classifier head's few rows average too little, and
# moving every row of a head alike shifts every logit alike, which a leaker could undo for free.
MIN_ROWS = 32
# Automatic carrier count: one per this many eligible layers, within these bounds. Two for the
# example CNN; several for a transformer, so that a layer lost whole costs few Reed-Solomon symbols.
LAYERS_PER_CARRIER = 4
MIN_LAYERS, MAX_LAYERS = 2, 8
SHIFT_VISIBLE = 1e-3
SKIP_NAMES = ("embed", "wte", "wpe", "lm_head", "shared.weight")  # token tables, tied output heads


def _eligible(name: str, t: torch.Tensor) -> bool:
    """Conv filters with more than one input channel (the first conv sees raw pixels and is small),
    or Linear weights with enough rows; never embeddings or normalisation parameters (1-D)."""
    if not t.is_floating_point() or t.dim() < 2 or t.shape[0] < MIN_ROWS:
        return False
    if any(s in name.lower() for s in SKIP_NAMES):
        return False
    if t.dim() == 2:
        return t.shape[1] >= 64
    return t.shape[1] > 3 or math.prod(t.shape[1:]) >= 64


def used_weights(model: torch.nn.Module, sample) -> list[str]:
    """Weights of plain Linear and Conv layers that the model's output depends on, in module order.

    Found by one backward pass on a few real inputs: a layer the forward never reaches (a pooler whose
    output is dropped, an unused head) would carry a mark that a leaker can delete for free. So would
    a layer whose outputs are normalised together (a Linear feeding a residual LayerNorm, as every
    transformer block's output projections do): moving all its rows alike adds the same value to
    every output, which the LayerNorm subtracts again, so the leaker could centre the rows without
    changing the model. Grouped and depthwise convolutions are left out: their filters see different
    input channels, so a mean over filters mixes unrelated weights.
    """
    from ... import batches

    layers = {
        f"{n}.weight" if n else "weight": m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        or (isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.groups == 1)
    }
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in layers if n in params}
    was_training = model.training
    model.eval()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in weights)
            p.grad = None
        out = batches.call(model, sample).float()
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out * probe).sum().backward()
        used = [n for n, p in weights.items() if p.grad is not None and _shift_visible(p.grad)]
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)
    return used


def _shift_visible(grad: torch.Tensor) -> bool:
    """Whether moving every row alike changes the output: the gradient of the shared shift (the sum
    of the rows' gradients) is not negligible next to the gradient itself (~1e-7 when invisible)."""
    total = float(grad.norm())
    return total > 0 and float(grad.reshape(grad.shape[0], -1).sum(0).norm()) > SHIFT_VISIBLE * total


def select(
    state: dict[str, torch.Tensor],
    total_bits: int,
    names: list[str] | None = None,
    count: int | None = None,
    allowed: list[str] | None = None,
    cost: Callable[[list[Carrier]], list[float]] | None = None,
) -> list[Carrier]:
    """Carriers among the eligible layers (in `allowed`'s order when given: the layers the output
    depends on) whose statistic is large enough: the `count` whose mark `cost` says changes the
    model least, else spread evenly over the depth. Bits are split in whole bytes so a layer lost
    whole costs whole Reed-Solomon symbols."""
    symbols = total_bits // 8
    if names:
        missing = [n for n in names if n not in state]
        if missing:
            raise BadInput(f"carrier layer {missing[0]!r} is not in the master's weights")
        chosen = list(names)
    else:
        order = [n for n in (allowed if allowed is not None else state) if n in state]
        eligible = [n for n in order if _eligible(n, state[n])]
        if count is None:
            count = min(MAX_LAYERS, max(MIN_LAYERS, len(eligible) // LAYERS_PER_CARRIER))
        count = max(1, min(count, symbols))
        while True:  # more, smaller shares of the bits until enough layers are large enough to hold one
            need = 8 * math.ceil(symbols / count) * MIN_DIMS_PER_BIT
            big = [n for n in eligible if math.prod(state[n].shape[1:]) >= need]
            if len(big) >= count or count >= min(symbols, len(eligible)):
                break
            count += 1
        if len(big) < count:
            raise BadInput(
                "no Linear or convolution layers in the master can carry the watermark's bits; "
                "name carriers with --carrier or use fewer --bits"
            )
        if cost is not None and len(big) > count:
            bits = 8 * math.ceil(symbols / count)
            costs = cost([Carrier(n, tuple(state[n].shape), 0, bits, signed=True) for n in big])
            cheapest = set(np.argsort(costs, kind="stable")[:count].tolist())
            chosen = [n for i, n in enumerate(big) if i in cheapest]
        else:
            picks = np.linspace(0, len(big) - 1, count).round().astype(int)
            chosen = [big[i] for i in picks]
    per, extra = divmod(symbols, len(chosen))
    carriers, start = [], 0
    for i, name in enumerate(chosen):
        shape = tuple(state[name].shape)
        bits = 8 * (per + (1 if i < extra else 0))
        c = Carrier(name, shape, start, bits, signed=True)
        if len(shape) < 2 or c.dim < MIN_DIMS_PER_BIT * bits:
            raise BadInput(
                f"layer {name!r} (statistic of {c.dim} values) is too small for {bits} bits; "
                "choose larger carrier layers or fewer bits"
            )
        carriers.append(c)
        start += bits
    return carriers


@dataclass(frozen=True)
class Embedding:
    """How a carrier's filters move to give its bits chosen statistics; fixed per carrier and run.

    Filter i moves by basis @ (signs[:, i] * coef): every change within reach of the signed
    statistics, and among those meeting the targets exactly the one smallest in the metric.
    """

    basis: np.ndarray  # dim x bits: metric^-1 x' (x' for minimal norm)
    signs: np.ndarray  # bits x rows
    gram: np.ndarray  # bits x bits: bit j's statistic per unit of coefficient k

    def change(self, targets: np.ndarray) -> np.ndarray:
        """Rows x dim change of the filters whose statistics equal `targets`."""
        coef = np.linalg.solve(self.gram, targets)
        return (self.signs.T * coef) @ self.basis.T


def embedding_map(secret: Secret, metric: np.ndarray | None = None) -> Embedding:
    """The change of a carrier's filters that meets every bit's statistic exactly and is smallest
    in `metric`, summed over filters.

    With no metric it has minimal norm: the closed-form optimum of the paper's embedding
    constraint. With the carrier's input second moments C as metric it minimises the mean squared
    change of the layer's outputs on real inputs: the mark goes where the data barely looks, so the
    copy needs no fine-tuning to stay faithful. Keyed signs let bits share those few cheap
    directions without crowding each other: on the example, at the same margins, 0.29% of test
    predictions differ from the master's against 0.53% with the plain filter mean (BENCHMARKS.md).
    """
    x = secret.x.astype(np.float64)
    basis = x.T if metric is None else np.linalg.solve(metric, x.T)
    rows = secret.signs.shape[1]
    gram = (secret.signs @ secret.signs.T / rows) * (x @ basis)
    return Embedding(basis, secret.signs, gram)

