"""The one entry point from files: an attack by name, its parameters checked against its declaration.

`api.attack`, `api.collude` and every `wmtrace attack` command come through `apply`, which loads the
weights (any format `formats.load_tensors` reads), runs the attack and writes safetensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import formats, modelio
from ..errors import BadArgument, BadInput
from .base import Attack, Param, State
from .catalog import ATTACKS
from .trainer import Trainer

# The example CNN and Fashion-MNIST, as `api.EXAMPLE_FACTORY` / `api.EXAMPLE_DATA` name them.
DEFAULT_MODEL = "wmtrace.example:build"
DEFAULT_DATA = "wmtrace.example:dataset"
_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string",
               list: "a list of names"}


def get(name: str) -> Attack:
    attack = ATTACKS.get(name)
    if attack is None:
        raise BadInput(f"unknown attack {name!r}: use one of {', '.join(ATTACKS)}")
    return attack


def _convert(p: Param, v: Any) -> Any:
    try:
        if p.type is list:
            if isinstance(v, (str, bytes)):
                raise TypeError
            v = [str(x) for x in v]
        elif p.type is bool:
            if not isinstance(v, bool):
                raise TypeError
        elif p.type in (int, float):
            if isinstance(v, (bool, str)) or (p.type is int and int(v) != v):
                raise TypeError
            v = p.type(v)
        elif not isinstance(v, str):
            raise TypeError
    except (TypeError, ValueError) as e:
        raise BadArgument(p.name, f"must be {_TYPE_WORDS[p.type]}, not {v!r}") from e
    if p.choices and v not in p.choices:
        raise BadArgument(p.name, f"{v!r}: choose from {', '.join(p.choices)}")
    return v


def check(attack: Attack, params: dict[str, Any]) -> dict[str, Any]:
    """Every declared parameter's value, in declaration order: the one given (None means the default),
    converted to the declared type and checked against its choices, or the declared default. Ranges
    are checked by the attack functions themselves, which Python callers use directly too."""
    declared = [p.name for p in attack.params]
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise BadArgument(unknown[0], f"is not a parameter of {attack.name} (it takes {', '.join(declared) or 'none'})")
    values = {}
    for p in attack.params:
        v = params.get(p.name)
        values[p.name] = (None if p.default is None else _convert(p, p.default)) if v is None else _convert(p, v)
    return values


def _load(source: formats.TensorSource) -> State:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in source.items()}


def _write(result: State, out: Path, first: formats.TensorSource, types: dict[str, str] | None) -> None:
    """safetensors, or GGUF (a leak as llama.cpp users pass it on): tensors in the types the attack
    chose (`requantize`), else in the input's, with the input's metadata."""
    if out.suffix != ".gguf":
        formats.save_safetensors(result, out)
        return
    if not first.quants:
        raise BadInput(f"{out}: writing GGUF needs a GGUF input (its metadata: tokenizer, architecture)")
    quants = {k: (types or {}).get(k, q) for k, q in first.quants.items()}
    formats.gguf.save_gguf({k: v.float().numpy() for k, v in result.items()}, first.reader, out, quants)


def _sources(attack: Attack, source: str | os.PathLike | Sequence[str | os.PathLike]) -> list:
    many = isinstance(source, Sequence) and not isinstance(source, (str, bytes))
    if attack.merges:
        files = list(source) if many else [source]
        if len(files) < 2:
            raise BadInput("give at least two model files to merge")
        return files
    if many:
        raise BadInput(f"{attack.name} takes one model file")
    return [source]


def apply(
    name: str,
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    factory: str = DEFAULT_MODEL,
    data: str = DEFAULT_DATA,
    **params: Any,
) -> dict:
    """Attack the weights in `source` (several files for a merging attack such as `collude`) with the
    attack `name` and its keyword parameters, write the result to `out` (safetensors; GGUF where `out`
    ends in .gguf and the input is GGUF, whose metadata it keeps), and return
    what was done: `attack`, `input` (or `inputs` and `file`), `output`, `strength`, every parameter
    used (`model` and `data` for attacks that need them), what the attack measured (e.g.
    `attacker_ber`, `task_accuracy`, `agreement`), `tensors` written and `shapes_changed`."""
    attack = get(name)
    values = check(attack, params)
    files = _sources(attack, source)
    out = Path(out)
    formats.writable_folder(out.parent)
    sources = [formats.open_tensors(f) for f in files]
    states = [_load(s) for s in sources]
    if attack.merges:
        info: dict = {"attack": name, "inputs": [str(f) for f in files], "output": str(out), "file": str(out)}
    else:
        info = {"attack": name, "input": str(files[0]), "output": str(out), "strength": values.get("strength", 0.0)}
    info.update((k, v) for k, v in values.items() if k != "strength")
    trainer = None
    if attack.needs_data:
        info["model"], info["data"] = factory, data
        trainer = Trainer(modelio.import_object(factory), modelio.import_object(data), seed=values.get("seed", 0))
    result = attack.run(states if attack.merges else states[0], trainer, info, **values)
    _write(result, out, sources[0], info.pop("gguf_types", None))
    first = states[0]
    info["tensors"] = len(result)
    info["shapes_changed"] = sorted(k for k in first if k in result and result[k].shape != first[k].shape)
    return info
