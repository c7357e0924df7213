"""`wmtrace demo`: the whole story on the bundled example."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import api
from .common import JsonOpt, emit, err, guarded, out
from .trace import print_trace


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
        emit(story)
        raise typer.Exit(0 if story["correct"] else 1)
    m, leak = story["master"], story["leak"]
    out.print(f"master {m['name']}: test accuracy {m['accuracy']:.2%}")
    for b in story["buyers"]:
        out.print(f"  issued {b['name']} (id {b['id']}): agreement {b['agreement']:.2%}, accuracy {b['accuracy']:.2%}")
    out.print(
        f"{story['leaker']['name']} leaks its copy: {leak['pruned']:.0%} of weights pruned, exported to ONNX "
        f"(accuracy {leak['accuracy']:.2%}; onnxruntime agrees with torch on {leak['onnxruntime_agreement']:.2%})"
    )
    from ..pipeline.trace import TraceResult

    print_trace(TraceResult(**story["trace"]))
    served = story["served"]
    out.print(f"{served['buyer']['name']} serves its copy (ONNX) at {served['url']}, answering top-1 labels only:")
    print_trace(TraceResult(**served["query"]))
    if story["correct"]:
        out.print("correct buyer named", style="bold green")
    else:
        out.print("wrong or no buyer", style="bold red")
    raise typer.Exit(0 if story["correct"] else 1)

