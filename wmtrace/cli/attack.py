"""`wmtrace attack ...`: attack weight files as a leaker would, to measure what tracing survives.

One command per attack family, built from its declaration (`wmtrace.attacks.Attack`): an option per
parameter with the declared default, help and choices, plus FILE (FILES for merging attacks),
`-o/--out`, `--json`, and `--model`/`--data` for attacks that need the model code and data. A new
family in `wmtrace.attacks` gets its command here without any change to this module.
"""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..attacks import ATTACKS, Attack, Param
from .common import JsonOpt, derived, emit, group, out

app = group("Attack weight files as a leaker would (writes safetensors), to measure what a trace survives.")

FileArg = Annotated[Path, typer.Argument(help="Weights to attack (.safetensors / .onnx / checkpoint)")]
FilesArg = Annotated[list[Path] | None, typer.Argument(help="Two or more copies to merge")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Where to write the attacked weights (.safetensors)")]
ModelOpt = Annotated[str, typer.Option("--model", help="module:factory that builds the nn.Module")]
DataOpt = Annotated[str, typer.Option("--data", help="module:function(split) -> Dataset of (input, label)")]
# What the command prints after the arrow, besides the parameters: what the attack measured.
REPORTS = ("attacker_ber", "task_accuracy", "agreement", "psnr_to_copy", "task_psnr_before", "task_psnr")


def _option(attack: Attack, p: Param) -> inspect.Parameter:
    """The typer option for one declared parameter. Choices become an Enum, so a bad one is a usage
    error naming the valid values before anything is read."""
    kind: Any = {list: list[str], bool: bool, int: int, float: float}.get(p.type, str)
    default = p.default
    if p.choices:
        kind = enum.Enum(f"{attack.name}-{p.name}", {c: c for c in p.choices}, type=str)
        default = None if default is None else kind(default)
    if default is None and not p.required:
        kind = kind | None
    # Without a flag of its own, typer names the option after the parameter (`--no-NAME` too for a bool).
    annotation = Annotated[kind, typer.Option(*([p.flag] if p.flag else []), help=p.help)]
    if p.required:
        return inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    return inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _signature(attack: Attack) -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("files", kw, annotation=FilesArg, default=None) if attack.merges
              else inspect.Parameter("file", kw, annotation=FileArg),
              inspect.Parameter("out_path", kw, annotation=OutOpt)]
    params += [_option(attack, p) for p in attack.params]
    if attack.needs_data:
        params += [inspect.Parameter("factory", kw, annotation=ModelOpt, default=api.EXAMPLE_FACTORY),
                   inspect.Parameter("data", kw, annotation=DataOpt, default=api.EXAMPLE_DATA)]
    params.append(inspect.Parameter("as_json", kw, annotation=JsonOpt, default=False))
    return inspect.Signature(params)


def _show(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def report(attack: Attack, info: dict) -> None:
    """One line of what was done (and the tensors whose shapes changed)."""
    shown = [p.name for p in attack.params if p.name not in ("strength", "seed")] + list(REPORTS)
    extra = ", ".join(f"{k} {_show(info[k])}" for k in shown if info.get(k) is not None)
    strength = f"strength {info['strength']}" if "strength" in info else ""
    what = f" ({', '.join(s for s in (strength, extra) if s)})" if strength or extra else ""
    source = ", ".join(info["inputs"]) if attack.merges else info["input"]
    out.print(f"{attack.name}{what}: {source} -> {info['output']}")
    if info["shapes_changed"]:
        out.print(f"  shapes changed: {', '.join(info['shapes_changed'])}")


def command(attack: Attack):
    """The typer command of one attack: its declaration's options in, `api.attack` out."""

    def run(out_path: Path, as_json: bool = False, **params) -> None:
        source = (params.pop("files") or []) if attack.merges else params.pop("file")
        params = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()}
        info = api.attack(attack.name, source, out_path, **params)
        if as_json:
            emit(info)
        else:
            report(attack, info)

    return derived(run, "attack_" + attack.name.replace("-", "_"), attack.summary, _signature(attack))


for _attack in ATTACKS.values():
    app.command(_attack.name, help=_attack.summary)(command(_attack))
