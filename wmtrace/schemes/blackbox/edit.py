"""The closed-form head edit that makes a copy answer its codeword, and the linear map read back.

A copy's head is W + dW(s), b + db(s), linear in the masked codeword s (+-1 per bit), in two parts:

  boundary  dW_B = D^T diag(alpha) V: query i must come out with logit(b_i) - logit(a_i) = margin * s_i
            (the top-1 answer is the bit). V_i = (Sigma + gamma I)^-1 h_i, Sigma the second moment of
            ordinary inputs' features, is the change of least mean square effect on ordinary inputs
            that moves query i; alpha solves the K x K system that sets every query at once.
  tilt      dW_T = tilt * U^T diag(s) T, db_T = -dW_T mu: each bit also tilts the logits of every
            ordinary input by tilt * u_k <t_k, h - mu>, along keyed directions t_k of the features'
            top principal components. A surrogate distilled from the copy's answers on natural data
            learns this tilt with the rest of the function, and least squares over natural queries
            reads it back (`read.py`).

Either way the logits of any input x move by L(x) s, with L(x) a known 10 x K matrix built from the
master's features of x: that one linear model is what every reading inverts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...coding import keys


@dataclass
class Basis:
    """What the edit and the reading share for one master and key (float64 tensors)."""

    pairs: torch.Tensor  # (K, 2) classes (a_i, b_i) of each boundary query
    directions: torch.Tensor  # V, (K, F)
    tilt_dirs: torch.Tensor  # T, (K, F)
    tilt_classes: torch.Tensor  # U, (K, C), rows zero-mean and unit norm
    mean: torch.Tensor  # mu, (F,)
    mask: torch.Tensor  # (K,) keyed +-1: s = mask * (2 c - 1)
    margin: float
    tilt: float
    classes: int

    @property
    def bits(self) -> int:
        return len(self.pairs)

    def signed(self, bits: np.ndarray) -> torch.Tensor:
        """The masked signs s the copy carries for codeword bits (0/1)."""
        return self.mask * (2.0 * torch.as_tensor(bits, dtype=torch.float64) - 1.0)

    def d(self) -> torch.Tensor:
        """D, (K, C): e_b - e_a per query."""
        d = torch.zeros(self.bits, self.classes, dtype=torch.float64)
        rows = torch.arange(self.bits)
        d[rows, self.pairs[:, 1]] = 1.0
        d[rows, self.pairs[:, 0]] = -1.0
        return d

    def tilt_map(self, feats: torch.Tensor) -> torch.Tensor:
        """(n, C, K): how each bit's tilt moves the logits of inputs with features `feats`."""
        p = (feats - self.mean) @ self.tilt_dirs.T  # (n, K)
        return self.tilt * torch.einsum("nk,kc->nck", p, self.tilt_classes)

    def solve(self, query_feats: torch.Tensor, query_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, offset) with alpha = A s + offset: the boundary coefficients that put every query at
        `margin * s_i` given the model's own features and logits there (the tilt included)."""
        d = self.d()
        gram = (d @ d.T) * (self.directions @ query_feats.T).T  # G_ij = <d_i, d_j> <v_j, h_i>
        rows = torch.arange(self.bits)
        base = query_logits[rows, self.pairs[:, 1]] - query_logits[rows, self.pairs[:, 0]]
        crosstalk = torch.einsum("ic,ick->ik", d, self.tilt_map(query_feats))  # tilt's margin change at query i
        target = self.margin * torch.eye(self.bits, dtype=torch.float64) - crosstalk
        a = torch.linalg.solve(gram, target)
        offset = torch.linalg.solve(gram, -base)
        return a, offset

    def edit(self, s: torch.Tensor, query_feats: torch.Tensor,
             query_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) of the copy carrying signs `s`, for a model with these features/logits at the queries."""
        a, offset = self.solve(query_feats, query_logits)
        alpha = a @ s + offset
        dw = (self.d().T * alpha) @ self.directions
        dw_tilt = self.tilt * (self.tilt_classes.T * s) @ self.tilt_dirs
        return dw + dw_tilt, -(dw_tilt @ self.mean)

    def linear(self, feats: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """L(x), (n, C, K): the logit change of each input per unit of each sign, for boundary
        coefficients alpha = A s (`solve`)."""
        p = feats @ self.directions.T  # (n, K): <v_i, h(x)>
        boundary = torch.einsum("ic,ni,ik->nck", self.d(), p, a)
        return boundary + self.tilt_map(feats)


def keyed(key: bytes, count: int, classes: int, pcs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, T, U) from the master key: the whitening signs, and each bit's tilt direction in the
    features (a keyed unit combination of the scaled principal components `pcs`, (P, F)) and over
    the classes (keyed, zero-mean, unit norm). Separate key labels make the mask independent of the
    rest, which is what makes an unmarked model's bits fair coins (`coding.accuse`)."""
    mask = torch.from_numpy(keys.signs(key, "blackbox/mask", 1, count)[0])
    r = torch.from_numpy(keys.projection(key, "blackbox/tilt-features", count, len(pcs)))
    r = r / r.norm(dim=1, keepdim=True)
    u = torch.from_numpy(keys.projection(key, "blackbox/tilt-classes", count, classes))
    u = u - u.mean(1, keepdim=True)
    u = u / u.norm(dim=1, keepdim=True)
    return mask, r @ pcs.double(), u
