"""`wmtrace query`: name the buyer behind a deployed model from its answers alone.

The target is an endpoint (Open Inference Protocol v2 `.../v2/models/NAME`, or an OpenAI-compatible
`.../v1/embeddings`) or a model file run as a black box; `--reveal` says what it shows. A bearer
token for the endpoint is read from $WMTRACE_TARGET_TOKEN, never from the command line (where `ps`
and shell history would keep it).
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import api, targets
from .common import JsonOpt, MasterOpt, MaxFpOpt, RegistryOpt, emit, err, guarded
from .trace import print_trace

Reveal = Enum("Reveal", {r: r for r in targets.REVEALS}, type=str)  # click lists the choices in its error


def _needs_factory(spec: str) -> bool:
    """A weight file other than ONNX is run in torch, so it needs the code that builds its model:
    the master's factory. Endpoints and ONNX files need none."""
    return not spec.startswith(("http://", "https://")) and not spec.lower().endswith(".onnx")


@guarded
def query(
    target: Annotated[str, typer.Argument(help="Endpoint URL (.../v2/models/NAME, .../v1/embeddings) or model file")],
    reveal: Annotated[Reveal | None, typer.Option(help="What the target shows [default: what it declares]")] = None,
    k: Annotated[int, typer.Option("--k", help="Classes a local file reveals with --reveal topk")] = 5,
    decimals: Annotated[
        int | None, typer.Option(help="Decimals a local file's top-k probabilities are rounded to")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name an embeddings endpoint runs")] = None,
    input_name: Annotated[str | None, typer.Option(help="Input tensor name [default: from metadata]")] = None,
    output_name: Annotated[str | None, typer.Option(help="Output tensor name (top-k: INDICES,SCORES)")] = None,
    budget: Annotated[int | None, typer.Option(help="Most queries to send [default: the scheme's own]")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request")] = 10.0,
    retries: Annotated[int, typer.Option(help="Retries on connection errors, timeouts, 429 and 5xx")] = 3,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once")] = 4,
    master: MasterOpt = None,
    max_fp: MaxFpOpt = 1e-6,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the buyer behind a deployed model by querying it (its weights are never read)."""
    # The target is opened first where it needs no registry: an endpoint is contacted once (no query
    # spent), so a wrong URL is reported before anything else is read.
    reg = api.open_registry(registry) if _needs_factory(target) else None
    factory = reg.master(master).factory if reg is not None else None
    with targets.open_target(
        target, reveal=reveal.value if reveal else None, k=k, decimals=decimals, model=model, input_name=input_name,
        output_name=output_name, timeout=timeout, retries=retries, concurrency=concurrency, factory=factory,
    ) as t:
        with _progress(disable=as_json) as progress:
            result = api.query(t, reg or api.open_registry(registry), master, max_fp, budget=budget,
                               progress=progress)
    if as_json:
        emit(result.to_dict())
    else:
        print_trace(result)
    raise typer.Exit(result.exit_code)


@contextmanager
def _progress(disable: bool):
    """A bar on stderr: answers received of those planned, with the time left (a session over a slow
    endpoint can take minutes)."""
    bar = Progress(TextColumn("querying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err,
                   transient=True, disable=disable)
    task = bar.add_task("query", total=None)

    def update(done: int, planned: int) -> None:
        bar.update(task, completed=done, total=planned)

    with bar:
        yield update
