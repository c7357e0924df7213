"""`wmtrace` command line: a thin layer over `wmtrace.api`.

Every command takes `--registry DIR` (default: $WMTRACE_REGISTRY or ./registry) and `--json`.
Exit codes: 0 success / buyer identified, 1 no buyer identified, 2 bad input.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import api

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors
from .errors import WmtraceError


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, `--buyers abc`) as one `error:` line and exit code 2, like
    every other error, instead of a boxed usage panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:
            err.print(e.ctx.get_help() if e.ctx else str(e))
            code = 2
        except click_errors.ClickException as e:
            command = f" (see 'wmtrace {e.ctx.command_path.partition(' ')[2]} --help')".replace("  ", " ") \
                if getattr(e, "ctx", None) is not None else ""
            err.print(Text.assemble(("error:", "red"), f" {e.format_message()}{command}"), soft_wrap=True)
            code = e.exit_code
        except typer.Abort:
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Per-buyer watermarks for neural network weights, and tracing of leaked copies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
attack_app = typer.Typer(
    help="Attack weight files as a leaker would (writes safetensors), to measure what a trace survives.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(attack_app, name="attack")
# User strings (paths, names) are never read as Rich markup: styles are given as Text, not "[tags]".
out = Console(soft_wrap=True, markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)

RegistryOpt = Annotated[
    Path | None, typer.Option("--registry", help="Registry folder [default: $WMTRACE_REGISTRY or ./registry]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout")]
MasterOpt = Annotated[str | None, typer.Option("--master", help="Registered master [default: the only one]")]


def _fail(message: str, code: int = 2) -> None:
    err.print(Text.assemble(("error:", "red"), f" {message}"), soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn):
    """One line and exit code 2 for any failure; a traceback only with WMTRACE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except WmtraceError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted; nothing half-written was kept", 130)
        except OSError as e:
            if os.environ.get("WMTRACE_DEBUG"):
                raise
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}")
        except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
            if os.environ.get("WMTRACE_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {e} (set WMTRACE_DEBUG=1 for details)")

    return wrapper


def _emit(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
@guarded
def init(
    name: Annotated[str, typer.Option(help="Name of the master in the registry")] = api.EXAMPLE_MASTER,
    weights: Annotated[Path | None, typer.Option(help="Master weights (.safetensors or checkpoint)")] = None,
    model: Annotated[str, typer.Option(help="module:factory that builds the nn.Module")] = api.EXAMPLE_FACTORY,
    data: Annotated[
        str | None, typer.Option(help="module:function(split) -> Dataset, split in {train, test}")
    ] = api.EXAMPLE_DATA,
    carriers: Annotated[
        list[str] | None, typer.Option("--carrier", help="Carrier weight name (repeat) [default: automatic]")
    ] = None,
    bits: Annotated[int, typer.Option(help="Codeword length in bits (multiple of 8)")] = 256,
    placement: Annotated[
        str, typer.Option(help="Closed-form placement: activation (least output change) or minimal-norm")
    ] = "activation",
    repair_steps: Annotated[
        int, typer.Option(help="Distillation steps after placement, per buyer (0: none, the measured best)")
    ] = 0,
    output: Annotated[
        str, typer.Option(help="What the model returns: logits (classifier) or embedding (encoder)")
    ] = "logits",
    loss: Annotated[
        str | None, typer.Option(help="module:function(output, master_output) -> loss, for repair steps")
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="Number of carrier layers [default: 2 to 8, by model size]")
    ] = None,
    strength: Annotated[
        float, typer.Option(help="Mark strength: RMS change of a carrier's filters over its weights' RMS")
    ] = api.embed.EmbedConfig.strength,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a master model (with no --weights: the bundled Fashion-MNIST example, trained once).

    Weights may be a .safetensors file, a sharded Hugging Face folder or index, or a checkpoint.
    --data may be unlabeled: issuing distils from the master's own outputs."""
    reg = api.open_registry(registry, create=True)
    if weights is None and name == api.EXAMPLE_MASTER and model == api.EXAMPLE_FACTORY:
        m = api.ensure_example(reg, progress=_training_progress() if not as_json else None)
    elif weights is None:
        _fail("--weights is required for a master other than the bundled example")
    else:
        m = api.init(reg, name, weights, model, data, carriers or None, bits, layers=layers, strength=strength,
                     steps=repair_steps, placement=placement, output=output, loss=loss)
    info = {
        "master": m.name,
        "factory": m.factory,
        "data": m.data,
        "accuracy": m.accuracy,
        "carriers": [{"name": c["name"], "shape": c["shape"], "bits": c["bits"]} for c in m.config["carriers"]],
        "code": m.config["code"],
        "key_fingerprint": m.key_fingerprint,
        "registry": str(reg.root),
    }
    if as_json:
        _emit(info)
        return
    out.print(Text.assemble("registered master ", (m.name, "bold"), f" in {reg.root} (key {m.key_fingerprint})"))
    for c in info["carriers"]:
        out.print(f"  carrier {c['name']} {tuple(c['shape'])}: {c['bits']} bits")
    if m.accuracy is not None:
        out.print(f"  test accuracy {m.accuracy:.2%}")


def _training_progress():
    bar = Progress(TextColumn("training example master"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, transient=True)
    task = None

    def cb(step: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("train", total=total)
        bar.update(task, completed=step)
        if step >= total:
            bar.stop()

    return cb


@app.command()
@guarded
def issue(
    buyers: Annotated[int | None, typer.Option(help="Number of buyer copies to issue")] = None,
    names: Annotated[Path | None, typer.Option(help="File with one buyer name per line")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder [default: ./buyers/MASTER]")] = None,
    master: MasterOpt = None,
    eval_samples: Annotated[
        int | None, typer.Option(help="Held-out samples to measure each copy's fidelity on (0: skip) [default: all]")
    ] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn the master into buyer copies, each carrying its buyer's ID, each verified by tracing it."""
    name_list = None
    if names is not None:
        try:
            name_list = [ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"{names}: cannot read buyer names ({getattr(e, 'strerror', None) or e})")
    if buyers is None and name_list is None:
        _fail("give --buyers N or --names FILE")
    api.check_issue(buyers, name_list, eval_samples)
    reg = api.open_registry(registry, create=True)
    if not reg.masters() and master is None and not as_json:
        err.print("no master registered yet: setting up the bundled Fashion-MNIST example")
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}/{task.total:.0f}"),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, disable=as_json,
    )
    tasks: dict[str, int] = {}

    def progress(done: int, n: int, step: int, steps: int, margin: float) -> None:
        count["done"] = done
        if not tasks:
            tasks["buyers"] = bar.add_task("buyers issued", total=n, info="", done=0)
        repairing = 0 < step < steps
        info = f"buyer {done + 1}: repair step {step}/{steps}, " if repairing else ""
        bar.update(tasks["buyers"], completed=done + (step / steps if repairing else 0), done=done,
                   info=f"{info}bit margin {margin:.2f}")

    count = {"done": 0, "of": len(name_list) if name_list is not None else buyers}
    try:
        with bar:
            issued = api.issue(reg, buyers, name_list, out_dir, master, progress=progress, eval_samples=eval_samples)
    except KeyboardInterrupt:
        rest = "run the same command again: names already issued are skipped" if name_list is not None else \
            f"'--buyers {count['of'] - count['done']}' issues the rest"
        _fail(f"interrupted after {count['done']} of {count['of']} copies, each of them written and registered; "
              f"{rest}", 130)
    skipped = [n for n in name_list or [] if n not in {b.name for b in issued}]
    if skipped and not as_json:
        err.print(f"{len(skipped)} of the names were issued before and are skipped")
    rows = [
        {"id": b.id, "name": b.name, "file": b.file, "agreement": b.agreement, "accuracy": b.accuracy,
         "cosine": b.cosine}
        for b in issued
    ]
    if as_json:
        _emit({"buyers": rows, "skipped": skipped})
        return
    encoder = any(r["cosine"] is not None for r in rows)
    columns = ("cosine", "retrieval agreement") if encoder else ("agreement", "accuracy")
    table = Table("id", "name", *columns, "file", title=f"issued {len(rows)} buyer copies")
    for r in rows:
        first = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
        values = (first, _pct(r["agreement"])) if encoder else (_pct(r["agreement"]), _pct(r["accuracy"]))
        table.add_row(str(r["id"]), r["name"], *values, r["file"])
    out.print(table)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


@app.command()
@guarded
def trace(
    file: Annotated[Path, typer.Argument(help="Leaked .safetensors / .onnx / checkpoint, or a folder")],
    master: MasterOpt = None,
    max_fp: Annotated[
        float, typer.Option("--max-false-positive", help="Accuse only below this false-accusation probability")
    ] = 1e-6,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the buyer behind a leaked model file (no model code needed)."""
    reg = api.open_registry(registry)
    result = api.trace(file, reg, master, max_fp)
    if as_json:
        _emit(result.to_dict())
    else:
        _print_trace(result)
    raise typer.Exit(result.exit_code)


def _print_trace(r) -> None:
    colour = {"identified": "green", "colluders": "magenta", "no watermark": "yellow"}.get(r.verdict, "red")
    out.print(Text.assemble((r.verdict, f"bold {colour}"), f"  {r.file}"))
    if r.master:
        out.print(f"  master: {r.master}")
    for c in r.carriers:
        out.print(f"  carrier {c['carrier']} found as {c['found_as']} (similarity {c['similarity']:.3f})")
    if r.colluders:
        out.print(f"  {r.reason}")
        for c in r.colluders:
            out.print(Text.assemble(
                "  accused: ", (c["name"], "bold"), f" (id {c['id']}): score {c['score']:.2f}, "
                f"probability that an innocent buyer scores this high <= {c['false_accusation_bound']:.2e}"
            ))
    elif r.buyer:
        out.print(Text.assemble("  buyer: ", (r.buyer["name"], "bold"), f" (id {r.buyer['id']})"))
        out.print(
            f"  evidence: {r.bit_errors} of {r.bits - r.bits_missing} bits flipped, {r.bits_missing} missing; "
            f"{r.symbol_errors} symbol errors corrected, {r.erasures} erasures"
        )
        out.print(f"  probability that an unmarked model gives this verdict: <= {r.false_positive_probability:.2e}")
    elif r.reason:
        out.print(f"  {r.reason}")


@attack_app.command("collude")
@guarded
def attack_collude(
    files: Annotated[list[Path] | None, typer.Argument(help="Two or more copies to merge")] = None,
    how: Annotated[str, typer.Option(help="average | layers | majority (per-weight median)")] = "average",
    output: Annotated[Path | None, typer.Option("-o", "--out", help="Merged model (.safetensors)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge several buyers' copies into one model, as colluding buyers would."""
    if output is None:
        _fail("give the output file with -o OUT")
    info = api.collude(files or [], how, output)
    if as_json:
        _emit(info)
        return
    out.print(f"merged {len(info['inputs'])} copies ({how}) into {info['file']}")


@app.command("buyers")
@guarded
def buyers_cmd(master: MasterOpt = None, registry: RegistryOpt = None, as_json: JsonOpt = False) -> None:
    """List issued buyer copies."""
    reg = api.open_registry(registry)
    rows = [b.public() for b in api.list_buyers(reg, master)]
    if as_json:
        _emit({"buyers": rows})
        return
    table = Table("master", "id", "name", "agreement", "accuracy", "cosine", "sha256", "file")
    for r in rows:
        cosine = "-" if r["cosine"] is None else f"{r['cosine']:.5f}"
        table.add_row(r["master"], str(r["id"]), r["name"], _pct(r["agreement"]), _pct(r["accuracy"]), cosine,
                      (r["sha256"] or "")[:12], r["file"] or "")
    out.print(table)


@app.command()
@guarded
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where the demo keeps its registry and files")] = Path(
        "wmtrace-demo"
    ),
    buyers: Annotated[int, typer.Option(help="Buyer copies to issue")] = 3,
    prune: Annotated[float, typer.Option(help="Fraction of weights the leaker prunes")] = 0.8,
    as_json: JsonOpt = False,
) -> None:
    """Train the example master (once), issue copies, leak one pruned as ONNX, and trace it."""
    if not as_json:
        err.print(f"demo in {directory}: example master, {buyers} buyers, one leaked with {prune:.0%} pruning as ONNX")
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, disable=as_json,
    )
    tasks: dict[str, int] = {}

    def progress(done: int, n: int, step: int, steps: int, margin: float) -> None:
        if "buyers" not in tasks:
            tasks["buyers"] = bar.add_task("issuing buyers", total=n)
        bar.update(tasks["buyers"], completed=done + (step / steps if 0 < step < steps else 0))

    def train_progress(step: int, total: int) -> None:
        if "train" not in tasks:
            tasks["train"] = bar.add_task("training example master", total=total)
        bar.update(tasks["train"], completed=step)

    with bar:
        story = api.demo(directory, buyers, prune, progress=progress, train_progress=train_progress)
    if as_json:
        _emit(story)
        raise typer.Exit(0 if story["correct"] else 1)
    m, leak = story["master"], story["leak"]
    out.print(f"master {m['name']}: test accuracy {m['accuracy']:.2%}")
    for b in story["buyers"]:
        out.print(f"  issued {b['name']} (id {b['id']}): agreement {b['agreement']:.2%}, accuracy {b['accuracy']:.2%}")
    out.print(
        f"{story['leaker']['name']} leaks its copy: {leak['pruned']:.0%} of weights pruned, exported to ONNX "
        f"(accuracy {leak['accuracy']:.2%}; onnxruntime agrees with torch on {leak['onnxruntime_agreement']:.2%})"
    )
    from .trace import TraceResult

    _print_trace(TraceResult(**story["trace"]))
    if story["correct"]:
        out.print("correct buyer named", style="bold green")
    else:
        out.print("wrong or no buyer", style="bold red")
    raise typer.Exit(0 if story["correct"] else 1)


FileArg = Annotated[Path, typer.Argument(help="Weights to attack (.safetensors / .onnx / checkpoint)")]
OutOpt = Annotated[Path, typer.Option("-o", "--out", help="Where to write the attacked weights (.safetensors)")]
SeedOpt = Annotated[int, typer.Option(help="Random seed")]
ModelOpt = Annotated[str, typer.Option("--model", help="module:factory that builds the nn.Module")]
DataOpt = Annotated[str, typer.Option("--data", help="module:function(split) -> Dataset of (input, label)")]


def _attack(kind: str, file: Path, out_path: Path, strength: float, as_json: bool, **kw) -> None:
    info = api.attack(kind, file, out_path, strength, **kw)
    if as_json:
        _emit(info)
        return
    extra = "".join(f", {k} {info[k]}" for k in ("mode", "lr", "steps", "attacker_ber", "task_accuracy") if k in info)
    out.print(f"{kind} (strength {strength}{extra}): {file} -> {out_path}")
    if info["shapes_changed"]:
        out.print(f"  shapes changed: {', '.join(info['shapes_changed'])}")


@attack_app.command("prune")
@guarded
def attack_prune(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Fraction of conv/linear weights set to zero")] = 0.5,
    mode: Annotated[str, typer.Option(help="global | layer (same fraction per layer) | random")] = "global",
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Unstructured pruning: smallest magnitudes globally or per layer, or random weights."""
    _attack("prune", file, out_path, strength, as_json, mode=mode, seed=seed)


@attack_app.command("prune-filters")
@guarded
def attack_prune_filters(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Fraction of output filters removed per conv layer")] = 0.5,
    layers: Annotated[list[str] | None, typer.Option("--layer", help="Conv weight to prune (repeat) [all]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Structured pruning: remove the lowest-L1 filters and the next layer's matching inputs (shapes shrink)."""
    _attack("prune-filters", file, out_path, strength, as_json, layers=layers or None)


@attack_app.command("quantize")
@guarded
def attack_quantize(
    file: FileArg, out_path: OutOpt,
    mode: Annotated[str, typer.Option(help="fp16 | bf16 | int8 (per tensor) | int8-channel")] = "int8-channel",
    as_json: JsonOpt = False,
) -> None:
    """Lower precision; int8 weights are stored as int8 plus a float32 NAME_scale tensor."""
    _attack("quantize", file, out_path, 0.0, as_json, mode=mode)


@attack_app.command("noise")
@guarded
def attack_noise(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Noise std relative to each weight tensor's std")] = 0.1,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Gaussian noise on every conv/linear weight."""
    _attack("noise", file, out_path, strength, as_json, seed=seed)


@attack_app.command("permute")
@guarded
def attack_permute(
    file: FileArg, out_path: OutOpt,
    strength: Annotated[float, typer.Option(help="Dummy channels added per existing channel")] = 0.25,
    rescale: Annotated[bool, typer.Option(help="Also rescale channels across BatchNorm and ReLU")] = True,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Function-preserving: permute, rescale and pad hidden channels with dummies (outputs unchanged)."""
    _attack("permute", file, out_path, strength, as_json, seed=seed, rescale=rescale)


@attack_app.command("permute-attention")
@guarded
def attack_permute_attention(
    file: FileArg, out_path: OutOpt,
    heads: Annotated[int, typer.Option(help="Attention heads per layer (the model's num_attention_heads)")],
    strength: Annotated[float, typer.Option(help="Log-std of the q/k rescaling factors (0: permute only)")] = 1.0,
    seed: SeedOpt = 0, as_json: JsonOpt = False,
) -> None:
    """Function-preserving, BERT-style attention: reorder heads, permute and rescale q/k dimensions."""
    _attack("permute-attention", file, out_path, strength, as_json, heads=heads, seed=seed)


@attack_app.command("center")
@guarded
def attack_center(
    file: FileArg, out_path: OutOpt,
    layers: Annotated[list[str], typer.Option("--layer", help="Linear weight to centre (repeat)")],
    as_json: JsonOpt = False,
) -> None:
    """Subtract the mean row of Linear layers (function-preserving where a LayerNorm follows)."""
    _attack("center", file, out_path, 0.0, as_json, layers=layers)


@attack_app.command("project")
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


@attack_app.command("finetune")
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


@attack_app.command("transfer")
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


@attack_app.command("overwrite")
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


@attack_app.command("shift")
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


registry_app = typer.Typer(
    help="Back up and restore the registry: its keys are the one thing that must never be lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(registry_app, name="registry")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@registry_app.command("backup")
@guarded
def registry_backup(
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder for the backup")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the database, keys and masters to DEST, verified (keys against their fingerprints)."""
    from .registry.backup import backup

    with api.open_registry(registry) as reg:
        info = backup(reg, dest)
    if as_json:
        _emit(info)
        return
    masters = ", ".join(f"{m['name']} (key {m['key_fingerprint']})" for m in info["masters"]) or "no master"
    out.print(f"backed up {reg.root} to {info['backup']}: {masters}, {info['buyers']} buyers, "
              f"{len(info['files'])} files, {_size(info['bytes'])}")
    out.print("it holds the secret keys: keep it where only you can read it, away from this machine")


@registry_app.command("restore")
@guarded
def registry_restore(
    src: Annotated[Path, typer.Argument(help="A folder written by 'wmtrace registry backup'")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup as the registry (a new or empty folder: a key is never overwritten)."""
    from .registry import default_path
    from .registry.backup import restore

    info = restore(src, registry if registry is not None else default_path())
    if as_json:
        _emit(info)
        return
    masters = ", ".join(f"{m['name']} (key {m['key_fingerprint']})" for m in info["masters"]) or "no master"
    out.print(f"restored {info['source']} (taken {info['created']}) into {info['registry']}: {masters}, "
              f"{info['buyers']} buyers, {len(info['files'])} files, all verified")


def main() -> None:  # pragma: no cover - console entry point
    app()
