"""`wmtrace init`: register a master (or set up the bundled example)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .. import api
from ..schemes.whitebox import Config
from .common import JsonOpt, RegistryOpt, emit, err, fail, guarded, out, print_table


# Over 60 lines only because each of init's seventeen options is declared in its signature (Typer's way).
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
        str, typer.Option(help="What the model returns: logits (classifier), embedding (encoder) or tokens "
                                  "(a language model's next-token logits)")
    ] = "logits",
    loss: Annotated[
        str | None, typer.Option(help="module:function(output, master_output) -> loss, for repair steps")
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="Number of carrier layers [default: 2 to 8, by model size]")
    ] = None,
    strength: Annotated[
        float, typer.Option(help="Mark strength: RMS change of a carrier's filters over its weights' RMS")
    ] = api.DEFAULT_STRENGTH,
    schemes: Annotated[
        str | None,
        typer.Option(help="Comma-separated: whitebox, blackbox, images [default: the first two where allowed]"),
    ] = None,
    bb_margin: Annotated[
        float | None, typer.Option(help="Black-box: logit margin of each answer at a boundary query [default: 1.0]")
    ] = None,
    bb_tilt: Annotated[
        float | None, typer.Option(help="Black-box: logit tilt per bit on ordinary inputs [default: 0.02]")
    ] = None,
    image_psnr: Annotated[
        float | None, typer.Option(help="Images: PSNR of a copy's output images to the master's [default: 45]")
    ] = None,
    image_layer: Annotated[
        str | None, typer.Option(help="Images: the convolution weight to mark [default: the smoothest]")
    ] = None,
    image_mirror: Annotated[
        bool, typer.Option("--image-mirror/--image-plain",
                           help="Images: a mark that survives surrogates trained on flipped pairs, or one that "
                                "survives JPEG, resizing and blur better")
    ] = True,
    fidelity: Annotated[
        float | None, typer.Option(help="Least fidelity of a copy on held-out data: top-1 agreement, or cosine "
                                        "for encoders; --strength is then the ceiling of a search (0: no target) "
                                        "[default: 0.99, 0.999 for encoders]")
    ] = None,
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
        fail("--weights is required for a master other than the bundled example")
    else:
        # Minutes on a real model (EfficientNet-Lite0: about 4 on two cores): say what is running; each
        # trial of the strength search is printed as it is measured.
        with err.status("registering: ranking carrier layers, placement moments, then the strength search"):
            m = api.init(reg, name, weights, model, data, carriers or None, bits, layers=layers, strength=strength,
                         steps=repair_steps, placement=placement, output=output, loss=loss,
                         scheme_names=[n.strip() for n in schemes.split(",") if n.strip()]
                         if schemes is not None else None,
                         bb_margin=bb_margin, bb_tilt=bb_tilt, fidelity_target=fidelity,
                         image_psnr=image_psnr, image_layer=image_layer, image_mirror=image_mirror,
                         progress=None if as_json else _trial_progress(output))
    info = {
        "master": m.name,
        "factory": m.factory,
        "data": m.data,
        "accuracy": m.accuracy,
        "schemes": sorted(m.config.schemes),
        "carriers": [{"name": c.name, "shape": list(c.shape), "bits": c.bits} for c in Config.of(m).carriers]
        if "whitebox" in m.config.schemes else [],
        "fidelity": m.config.fidelity,
        "calibration": (Config.of(m).calibration.to_dict()
                        if "whitebox" in m.config.schemes and Config.of(m).calibration else None),
        "blackbox": ({k: m.config.schemes["blackbox"][k] for k in ("head", "margin", "tilt")}
                     | {"queries": m.config.code.bits} if "blackbox" in m.config.schemes else None),
        "images": m.config.schemes.get("images"),
        "code": {"symbols": m.config.code.symbols, "name": m.config.code.name},
        "key_fingerprint": m.key_fingerprint,
        "registry": reg.location,
    }
    if as_json:
        emit(info)
        return
    out.print(Text.assemble("registered master ", (m.name, "bold"), f" in {reg.location} (key {m.key_fingerprint})"))
    for c in info["carriers"]:
        out.print(f"  carrier {c['name']} {tuple(c['shape'])}: {c['bits']} bits")
    if info["blackbox"]:
        bb = info["blackbox"]
        out.print(f"  black-box: {bb['queries']} boundary queries, head {bb['head']}, margin {bb['margin']:g}, "
                  f"tilt {bb['tilt']:g}")
    if info["calibration"]:
        print_table(_calibration_table(info["calibration"], m.config.output))
    if m.accuracy is not None:
        out.print(f"  test accuracy {m.accuracy:.2%}")


def _calibration_table(cal: dict, output: str) -> Table:
    """The strengths `init --fidelity` tried: what each cost in fidelity and what the reference attack
    left of its bits; the chosen one in bold."""
    what = "cosine" if output == "embedding" else "agreement"
    table = Table(title=f"mark strength for fidelity >= {cal['target']:g} (trial copies, held-out data)",
                  title_justify="left", box=box.SIMPLE_HEAD, expand=False)
    for col in ("strength", what, "bit errors after 80% pruning + int8", "margin left"):
        table.add_column(col, justify="right")
    for t in cal["trials"]:
        style = "bold" if t["strength"] == cal["strength"] else None
        table.add_row(f"{t['strength']:g}", f"{t['fidelity']:.2%}" if what == "agreement" else f"{t['fidelity']:.4f}",
                      str(t["bit_errors"]), f"{t['margin']:.2f}", style=style)
    return table


def _trial_progress(output: str):
    """One line per trial strength as it is measured (each marks and runs a copy on held-out data)."""
    what = "cosine" if output == "embedding" else "agreement"

    def cb(trial) -> None:
        value = f"{trial.fidelity:.4f}" if what == "cosine" else f"{trial.fidelity:.2%}"
        err.print(f"  trial strength {trial.strength:g}: {what} {value}, after 80% pruning + int8 "
                  f"{trial.bit_errors} bit errors, margin {trial.margin:.2f}", soft_wrap=True)

    return cb


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

