"""`wmtrace probes` and `wmtrace trace-images`: name the buyer behind an image-to-image model from the
images it produces on the master's probes.

    wmtrace probes --master denoiser -o probes/        # probe-00.png ... (send these to the suspect)
    wmtrace trace-images answers/ --master denoiser    # its outputs, named as the probes were
    wmtrace trace-images --model suspect.onnx --master denoiser   # or run a model file here
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import JsonOpt, MasterOpt, MaxFpOpt, RegistryOpt, emit, err, fail, guarded, out
from .trace import print_trace


@guarded
def probes(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write probe-NN.png into")],
    master: Annotated[str, typer.Option("--master", help="Registered master carrying the output-image mark")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the master's probe inputs as PNG files, to run a suspect image-to-image model on."""
    paths = api.write_probes(api.open_registry(registry), master, out_dir)
    if as_json:
        emit({"master": master, "probes": [str(p) for p in paths]})
    else:
        out.print(f"{len(paths)} probes of {master} in {out_dir} (run the suspect on them, keep the names)")


@guarded
def trace_images(
    outputs: Annotated[
        list[Path] | None, typer.Argument(help="Output images (files or folders), named as the probes were")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="A model file to run on the probes here (weights or .onnx) instead")
    ] = None,
    master: MasterOpt = None,
    max_fp: MaxFpOpt = 1e-6,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the buyer behind output images of the master's probes (same verdicts and bound as trace)."""
    if not outputs and model is None:
        fail("give output images (files or folders) or --model FILE")
    reg = api.open_registry(registry)
    with err.status("reading the images") if not as_json else nullcontext():
        result = api.trace_images(reg, outputs or None, master, model, max_fp)
    if as_json:
        emit(result.to_dict())
    else:
        print_trace(result)
    raise typer.Exit(result.exit_code)

