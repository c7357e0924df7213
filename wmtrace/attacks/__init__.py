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
"""

from .base import Attack, Param, State, prunable
from .catalog import ATTACKS
from .center import center
from .collude import COLLUDE_HOW, collude
from .distill import distill
from .files import apply, check, get
from .finetune import finetune
from .layers import BN_PARAMS, Hidden, hidden_layers, widths
from .noise import noise
from .overwrite import overwrite
from .permute import permute
from .permute_attention import permute_attention
from .project import PROJECT_PARTS, project
from .prune import PRUNE_MODES, prune, prune_global
from .prune_filters import prune_filters
from .quantize import QUANT_MODES, SCALE_SUFFIX, dequantize, quantize
from .shift import shift
from .trainer import Trainer
from .transfer import COARSE_GROUPS, TRANSFER_TUNE, task_accuracy, transfer

__all__ = [
    "ATTACKS", "BN_PARAMS", "COARSE_GROUPS", "COLLUDE_HOW", "PROJECT_PARTS", "PRUNE_MODES", "QUANT_MODES",
    "SCALE_SUFFIX", "TRANSFER_TUNE", "Attack", "Hidden", "Param", "State", "Trainer", "apply", "center", "check",
    "collude", "dequantize", "distill", "finetune", "get", "hidden_layers", "noise", "overwrite", "permute",
    "permute_attention", "project", "prunable", "prune", "prune_filters", "prune_global", "quantize", "shift",
    "task_accuracy", "transfer", "widths",
]
