"""`wmtrace attack ...`: attack weight files as a leaker would, to measure what tracing survives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import JsonOpt, emit, fail, group, guarded, out

app = group("Attack weight files as a leaker would (writes safetensors), to measure what a trace survives.")


@app.command("collude")
@guarded
def attack_collude(
    files: Annotated[list[Path] | None, typer.Argument(help="Two or more copies to merge")] = None,
    how: Annotated[str, typer.Option(help="average | layers | majority (per-weight median)")] = "average",
    output: Annotated[Path | None, typer.Option("-o", "--out", help="Merged model (.safetensors)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge several buyers' copies into one model, as colluding buyers would."""
    if output is None:
        fail("give the output file with -o OUT")
    info = api.collude(files or [], how, output)
    if as_json:
        emit(info)
        return
    out.print(f"merged {len(info['inputs'])} copies ({how}) into {info['file']}")


FileArg = Annotated[Path, typer.Argument(help="Weights to attack (.safetensors / .onnx / checkpoint)")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Where to write the attacked weights (.safetensors)")]
SeedOpt = Annotated[int, typer.Option(help="Random seed")]
ModelOpt = Annotated[str, typer.Option("--model", help="module:factory that builds the nn.Module")]
DataOpt = Annotated[str, typer.Option("--data", help="module:function(split) -> Dataset of (input, label)")]


def _attack(kind: str, file: Path, out_path: Path, strength: float, as_json: bool, **kw) -> None:
    info = api.attack(kind, file, out_path, strength, **kw)
    if as_json:
        emit(info)
        return
    extra = "".join(f", {k} {info[k]}" for k in ("mode", "lr", "steps", "attacker_ber", "task_accuracy") if k in info)
    out.print(f"{kind} (strength {strength}{extra}): {file} -> {out_path}")
    if info["shapes_changed"]:
        out.print(f"  shapes changed: {', '.join(info['shapes_changed'])}")


@app.command("prune")
@guarded
def attack_prune(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Fraction of conv/linear weights set to zero")] = 0.5,
    mode: Annotated[str, typer.Option(help="global | layer (same fraction per layer) | random")] = "global",
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Unstructured pruning: smallest magnitudes globally or per layer, or random weights."""
    _attack("prune", file, out_path, strength, as_json, mode=mode, seed=seed)


@app.command("prune-filters")
@guarded
def attack_prune_filters(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Fraction of output filters removed per conv layer")] = 0.5,
    layers: Annotated[list[str] | None, typer.Option("--layer", help="Conv weight to prune (repeat) [all]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Structured pruning: remove the lowest-L1 filters and the next layer's matching inputs (shapes shrink)."""
    _attack("prune-filters", file, out_path, strength, as_json, layers=layers or None)


@app.command("quantize")
@guarded
def attack_quantize(
    file: FileArg, out_path: OutOpt,
    mode: Annotated[str, typer.Option(help="fp16 | bf16 | int8 (per tensor) | int8-channel")] = "int8-channel",
    as_json: JsonOpt = False,
) -> None:
    """Lower precision; int8 weights are stored as int8 plus a float32 NAME_scale tensor."""
    _attack("quantize", file, out_path, 0.0, as_json, mode=mode)


@app.command("noise")
@guarded
def attack_noise(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Noise std relative to each weight tensor's std")] = 0.1,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Gaussian noise on every conv/linear weight."""
    _attack("noise", file, out_path, strength, as_json, seed=seed)


@app.command("permute")
@guarded
def attack_permute(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Dummy channels added per existing channel")] = 0.25,
    rescale: Annotated[bool, typer.Option(help="Also rescale channels across BatchNorm and ReLU")] = True,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Function-preserving: permute, rescale and pad hidden channels with dummies (outputs unchanged)."""
    _attack("permute", file, out_path, strength, as_json, seed=seed, rescale=rescale)


@app.command("permute-attention")
@guarded
def attack_permute_attention(
    file: FileArg, out_path: OutOpt,
    heads: Annotated[int, typer.Option(help="Attention heads per layer (the model's num_attention_heads)")],
    strength: Annotated[float, typer.Option(help="Log-std of the q/k rescaling factors (0: permute only)")] = 1.0,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Function-preserving, BERT-style attention: reorder heads, permute and rescale q/k dimensions."""
    _attack("permute-attention", file, out_path, strength, as_json, heads=heads, seed=seed)


@app.command("center")
@guarded
def attack_center(
    file: FileArg, out_path: OutOpt,
    layers: Annotated[list[str], typer.Option("--layer", help="Linear weight to centre (repeat)")],
    as_json: JsonOpt = False,
) -> None:
    """Subtract the mean row of Linear layers (function-preserving where a LayerNorm follows)."""
    _attack("center", file, out_path, 0.0, as_json, layers=layers)


@app.command("project")
@guarded
def attack_project(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Fraction of input directions, least visited by the data")] = 0.75,
    part: Annotated[str, typer.Option(help="mean: the filter mean's component; filters: every filter's")] = "mean",
    model: ModelOpt = api.EXAMPLE_FACTORY, data: DataOpt = api.EXAMPLE_DATA,
    as_json: JsonOpt = False,
) -> None:
    """Remove each layer's filter mean (or every filter) in the input directions the data visits least."""
    _attack("project", file, out_path, strength, as_json, mode=part, factory=model, data=data)


@app.command("finetune")
@guarded
def attack_finetune(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Epochs of fine-tuning (fractions allowed)")] = 1.0,
    lr: Annotated[float, typer.Option(help="Learning rate (SGD, Nesterov momentum 0.9)")] = 0.05,
    model: ModelOpt = api.EXAMPLE_FACTORY, data: DataOpt = api.EXAMPLE_DATA,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Fine-tune on the task without any regularizer."""
    _attack("finetune", file, out_path, strength, as_json, lr=lr, factory=model, data=data, seed=seed)


@app.command("transfer")
@guarded
def attack_transfer(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Epochs of fine-tuning on the new task (fractions allowed)")] = 1.0,
    lr: Annotated[float, typer.Option(help="Learning rate (SGD, Nesterov momentum 0.9)")] = 0.01,
    tune: Annotated[str, typer.Option(help="all (every layer) | last (new head + last conv layer)")] = "all",
    model: ModelOpt = api.EXAMPLE_FACTORY, data: DataOpt = api.EXAMPLE_DATA,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Transfer learning: new head for another task (the labels in 4 coarse groups), then fine-tune."""
    _attack("transfer", file, out_path, strength, as_json, lr=lr, mode=tune, factory=model, data=data, seed=seed)


@app.command("overwrite")
@guarded
def attack_overwrite(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Training steps embedding the attacker's own mark")] = 300,
    lr: Annotated[float, typer.Option(help="Learning rate")] = 0.01,
    model: ModelOpt = api.EXAMPLE_FACTORY, data: DataOpt = api.EXAMPLE_DATA,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Embed the attacker's own Uchida watermark (own key, 256 bits, lambda 0.01) in the same layers."""
    _attack("overwrite", file, out_path, strength, as_json, lr=lr, factory=model, data=data, seed=seed)


@app.command("shift")
@guarded
def attack_shift(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Shift of each conv layer's filter mean, in weight stds")] = 0.1,
    steps: Annotated[int, typer.Option(help="Fine-tuning steps after the shift")] = 200,
    lr: Annotated[float, typer.Option(help="Learning rate")] = 0.01,
    model: ModelOpt = api.EXAMPLE_FACTORY, data: DataOpt = api.EXAMPLE_DATA,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Weight shifting: move one filter per conv layer, then fine-tune briefly."""
    _attack("shift", file, out_path, strength, as_json, steps=steps, lr=lr, factory=model, data=data, seed=seed)

