"""The query set: inputs on the master's decision boundary between two classes, one per codeword bit.

Each query is a blend (1 - t) x_a + t x_b of two of the user's training inputs that the master puts
in different classes a and b, with t found by bisection so that the master's logits of a and b are
equal there and no third class is above them. On such an input the answer is decided by a hair, so
the closed-form head edit (`edit.py`) can set it to a or b per buyer while moving the logits of
ordinary inputs little: on the example CNN, 256 such queries at margin 1 change 0.4% of test
predictions (BENCHMARKS.md, "black-box"). The pairs and blend weights come from fresh randomness
at `init` and are stored with the master, never derived from anything public.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import nn

from ... import batches
from ...errors import BadInput

# t to within 2^-16: the master's two logits there differ by ~1e-4 (the edit solves for the exact value).
BISECTION_STEPS = 16


def _logits(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([batches.call(model, x[i : i + batch]) for i in range(0, len(x), batch)]).double()


def boundary(model: nn.Module, pool: torch.Tensor, count: int,
             seed: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """`count` boundary queries blended from `pool` (training inputs), and their class pairs (a, b)
    as an int64 array (count, 2). `seed` only for reproducible tests; otherwise fresh randomness."""
    if not isinstance(pool, torch.Tensor) or not pool.is_floating_point():
        raise BadInput("the black-box scheme needs tensor inputs (images, features) to blend queries from")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    predicted = _logits(model, pool).argmax(1).numpy()
    if len(np.unique(predicted)) < 2:
        raise BadInput("the master predicts one class for all training inputs given: no decision boundary to query")
    found_x: list[torch.Tensor] = []
    found_pairs: list[np.ndarray] = []
    have = 0
    for _ in range(50):  # rounds of candidates; each keeps most of its pairs on the example CNN
        i = rng.integers(0, len(pool), 2 * count)
        j = rng.integers(0, len(pool), 2 * count)
        keep = predicted[i] != predicted[j]
        i, j = i[keep], j[keep]
        x, pairs = _bisect(model, pool[i], pool[j], predicted[i], predicted[j])
        found_x.append(x)
        found_pairs.append(pairs)
        have += len(x)
        if have >= count:
            break
    x, pairs = torch.cat(found_x)[:count], np.concatenate(found_pairs)[:count]
    if len(x) < count:
        raise BadInput(f"found only {len(x)} of {count} boundary queries in the training inputs given")
    return x.float().contiguous(), pairs.astype(np.int64)


def _bisect(model: nn.Module, xa: torch.Tensor, xb: torch.Tensor, a: np.ndarray, b: np.ndarray):
    """Blends of xa and xb where the master's logits of a and b are equal; only those where a and
    b are the two largest logits there are kept."""
    lo = torch.zeros(len(xa), dtype=torch.float64)
    hi = torch.ones(len(xa), dtype=torch.float64)
    ia, ib = torch.from_numpy(a), torch.from_numpy(b)
    rows = torch.arange(len(xa))
    shape = (-1,) + (1,) * (xa.dim() - 1)
    for _ in range(BISECTION_STEPS):
        t = (lo + hi) / 2
        x = (xa.double() * (1 - t).view(shape) + xb.double() * t.view(shape)).to(xa.dtype)
        z = _logits(model, x)
        a_wins = z[rows, ia] > z[rows, ib]
        lo = torch.where(a_wins, t, lo)
        hi = torch.where(a_wins, hi, t)
    z = _logits(model, x)
    top2 = z.topk(2, dim=1).indices
    ok = ((top2[:, 0] == ia) & (top2[:, 1] == ib)) | ((top2[:, 0] == ib) & (top2[:, 1] == ia))
    ok &= (z[rows, ia] - z[rows, ib]).abs() < 1e-2
    return x[ok], np.stack([a, b], axis=1)[ok.numpy()]
