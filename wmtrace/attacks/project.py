"""Removing each layer's rarely used input directions: no training, no master, no knowledge of the carriers."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state
from .trainer import Trainer

PROJECT_PARTS = ("mean", "filters")


def _inputs(trainer: Trainer, samples: int):
    """The first `samples` training inputs (a tensor, or a dict of tensors): what an attacker runs
    through the copy."""
    from torch.utils.data import DataLoader

    from ..batches import split

    return split(next(iter(DataLoader(trainer.data("train"), batch_size=samples))))[0]


def project(state: State, strength: float, trainer: Trainer, part: str = "mean", samples: int = 1024) -> State:
    """Remove from every conv and Linear layer, in the `strength` fraction of input directions the
    attacker's data visits least (eigenvectors of the layer's input second moments on `samples`
    training inputs), either the filter mean's component (`part="mean"`) or every filter's
    (`"filters"`). Needs no master and no knowledge of which layers carry a mark. A mark that is one
    shift shared by all filters (Uchida et al.'s statistic), placed where the data barely looks (as
    activation-aware placement does, for fidelity), is removed by the first at almost no cost; the
    second removes whatever lies in those directions, at the cost of everything the master keeps there."""
    from ..schemes.whitebox.carriers import Carrier
    from ..schemes.whitebox.embed import input_moments

    if not 0.0 <= strength <= 1.0:
        raise BadInput(f"project: strength {strength} must be a fraction in [0, 1]")
    if part not in ("mean", "filters"):
        raise BadInput(f"project: unknown part {part!r} (mean, filters)")
    out = copy_state(state)
    convs = [n for n, v in state.items() if v.is_floating_point() and v.dim() in (2, 4)]  # Linear too
    model = trainer.model(state).eval()
    layers = [Carrier(n, tuple(state[n].shape), 0, 0) for n in convs]
    found = input_moments(model, layers, _inputs(trainer, samples), 0.0)
    for n, moments in zip(convs, found, strict=True):
        if moments is None:
            continue
        w = state[n].detach().double().reshape(state[n].shape[0], -1)
        vecs = torch.from_numpy(np.linalg.eigh(moments)[1][:, : round(strength * w.shape[1])])
        removed = (w.mean(0) @ vecs) @ vecs.T if part == "mean" else (w @ vecs) @ vecs.T
        out[n] = (w - removed).reshape(state[n].shape).to(state[n].dtype)
    return out



ATTACK = Attack(
    name="project",
    summary="Remove each layer's filter mean (or every filter) in the input directions the data visits least.",
    params=(
        Param("strength", float, 0.75, "Fraction of input directions, least visited by the data"),
        Param("mode", str, "mean", "mean: the filter mean's component; filters: every filter's",
              choices=PROJECT_PARTS, flag="--part"),
    ),
    run=lambda state, trainer, report, strength, mode: project(state, strength, trainer, mode),
    needs_data=True,
)
