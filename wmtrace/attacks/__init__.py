"""What a leaker does to a copy before leaking it, shipped so users can measure their own models.

Every attack takes a state dict of torch tensors and returns a new one (the input is not changed).
Each states what its `strength` means. Attacks that change channels (structured pruning,
permutation, rescaling, dummy channels) need to know which layer feeds which; they infer it from
the state dict alone, under one assumption (see `hidden_layers`). Attacks that train
(`finetune`, `transfer`, `overwrite`, `shift`, `distill`) and `project` need the model code and data:
a `module:factory` and a `module:function(split)` data entry point, the example CNN and
Fashion-MNIST by default.

One module per family (`prune.py`, `distill.py`, ...), each with its function(s) and one `Attack`
declaring its parameters once; `ATTACKS` maps every name to its declaration, `apply` runs one on
files by name (what `api.attack` and `wmtrace attack` do). A new family is a new module here and
its test: the catalog finds it and the CLI grows a command for it.

Attacks through the endpoint (what a leaker's server does with queries and answers) are declared the
same way in `serve_*.py` modules (`serving.ServingAttack`), listed in `SERVING_ATTACKS`; `serve` wraps
a model's predict function with one by name, `served` builds a leaker's deployment from files.

Attacks on a denoiser's output images are declared in `image_*.py` modules (`imaging.ImageAttack`),
listed in `IMAGE_ATTACKS`; `edit_images` runs one by name on images as (H, W, 3) uint8 arrays.
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BadInput
from . import imaging, serving
from .base import Attack, Param, State, prunable
from .catalog import ATTACKS, IMAGE_ATTACKS, SERVING_ATTACKS
from .center import center
from .collude import COLLUDE_HOW, collude
from .distill import distill
from .files import apply, check, get
from .finetune import finetune
from .imaging import ImageAttack
from .layers import BN_PARAMS, Hidden, hidden_layers, widths
from .noise import noise
from .overwrite import overwrite
from .permute import permute
from .permute_attention import permute_attention
from .project import PROJECT_PARTS, project
from .prune import PRUNE_MODES, prune, prune_global
from .prune_filters import prune_filters
from .quantize import QUANT_MODES, SCALE_SUFFIX, dequantize, quantize
from .serving import Predict, ServingAttack, file_predict
from .shift import shift
from .trainer import OPTIMIZERS, Trainer, last_layers, make_optimizer
from .transfer import COARSE_GROUPS, TRANSFER_TUNE, task_accuracy, transfer

__all__ = [
    "ATTACKS", "BN_PARAMS", "COARSE_GROUPS", "COLLUDE_HOW", "IMAGE_ATTACKS", "OPTIMIZERS", "PROJECT_PARTS",
    "PRUNE_MODES", "QUANT_MODES", "SCALE_SUFFIX", "SERVING_ATTACKS", "TRANSFER_TUNE", "Attack", "Hidden",
    "ImageAttack", "Param", "Predict", "ServingAttack", "State", "Trainer", "apply", "center", "check", "collude",
    "dequantize", "distill", "edit_images", "file_predict", "finetune", "get", "hidden_layers", "image_attack",
    "last_layers", "make_optimizer", "noise", "overwrite",
    "permute", "permute_attention", "project", "prunable", "prune", "prune_filters", "prune_global", "quantize",
    "serve", "serve_attack", "served", "shift", "task_accuracy", "transfer", "widths",
]


def serve_attack(name: str) -> ServingAttack:
    attack = SERVING_ATTACKS.get(name)
    if attack is None:
        raise BadInput(f"unknown serving attack {name!r}: use one of {', '.join(SERVING_ATTACKS)}")
    return attack


def serve(name: str, predicts: Sequence[Predict], data: np.ndarray | None = None, **params: Any) -> Predict:
    """`predicts` served through the serving attack `name`, its parameters checked against its
    declaration (as `apply` checks a weight attack's); `data`: the attacker's natural inputs."""
    attack = serve_attack(name)
    return serving.apply(attack, predicts, data, check(attack, params))  # `check` reads only name and params


def served(files: Sequence[str | os.PathLike], factory: str | None = None, attack: str | None = None,
           params: dict | None = None, data: np.ndarray | None = None) -> tuple[Predict, str | None]:
    """What a leaker's server runs: the copies in `files` loaded (`serving.file_predict`) and wrapped by
    the serving attack `attack` (None: one copy as it is), and the reveal the attack forces (or None)."""
    predicts = [file_predict(f, factory) for f in files]
    if attack is None:
        if len(predicts) != 1:
            raise BadInput("several copies are served together only through a merging serving attack (ensemble)")
        return predicts[0], None
    return serve(attack, predicts, data, **(params or {})), serve_attack(attack).reveal


def image_attack(name: str) -> ImageAttack:
    attack = IMAGE_ATTACKS.get(name)
    if attack is None:
        raise BadInput(f"unknown image attack {name!r}: use one of {', '.join(IMAGE_ATTACKS)}")
    return attack


def edit_images(name: str, images: Sequence, seed: int = 0, **params: Any) -> list[np.ndarray]:
    """`images` ((H, W, 3) uint8 arrays; for a merging attack such as `average`, one list of them per
    copy) edited by the image attack `name`, its parameters checked against its declaration (as `serve`
    checks a serving attack's) and its random choices drawn from `seed`. Returns new arrays."""
    attack = image_attack(name)
    return imaging.apply(attack, images, seed, check(attack, params))  # `check` reads only name and params
