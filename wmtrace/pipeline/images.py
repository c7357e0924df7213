"""Name the buyer behind an image-to-image model from its output images on the master's probes.

probes -> (a suspect model runs them) -> outputs -> align, subtract the master's outputs, project ->
decode -> accuse. The probes are the master's own inputs, stored at `init` (`wmtrace probes` writes
them as PNG files named `probe-NN.png`); outputs are matched to probes by that number in their file
names, or given in memory as (probe index, image) pairs. Every master registered with the output-image
scheme is tried (the bound split over them, as `trace` splits it), and one signed audit entry records
the session (`log_query`, reveal "images").
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import formats, modelio
from ..errors import BadArgument, BadInput
from ..formats import images as image_files
from ..registry import Buyer, Master, Registry
from ..schemes.images import NAME
from ..schemes.images.read import Reader
from ..schemes.images.scheme import stored_tensor
from .query import _named_by_score as named_by_score
from .trace import COLLUDERS, DEFAULT_MAX_FALSE_POSITIVE, IDENTIFIED, NO_WATERMARK, UNKNOWN_MASTER, Issued, TraceResult
from .trace import _verdict as verdict

PROBE_NAME = "probe-{:02d}.png"
_NUMBER = re.compile(r"probe-(\d+)")

Outputs = Sequence[tuple[int, torch.Tensor]]  # (probe index, C x H x W output in [0, 1])
Run = Callable[[torch.Tensor], torch.Tensor]  # probes (n, C, H, W) -> outputs, for a model in memory


def masters(reg: Registry, master: str | None) -> list[Master]:
    found = [reg.master(master)] if master else reg.masters()
    return [m for m in found if NAME in m.config.schemes]


def probes(reg: Registry, master: str) -> torch.Tensor:
    """The master's probe inputs, (n, C, H, W) on the 8-bit grid."""
    m = reg.master(master)
    if NAME not in m.config.schemes:
        raise BadInput(f"master {master!r} carries no output-image mark (register it with --schemes ...,images)")
    return stored_tensor(reg.stored(m), "probes").float()


def write_probes(reg: Registry, master: str, folder: str | os.PathLike) -> list[Path]:
    """The probes as lossless PNG files `probe-NN.png` in `folder` (created): what to run a suspect on."""
    x = probes(reg, master)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{folder}: cannot create ({e.strerror})") from e
    paths = []
    for i, p in enumerate(x):
        path = folder / PROBE_NAME.format(i)
        image_files.write_png(image_files.to_pixels(p), path)
        paths.append(path)
    return paths


def read_outputs(paths: Sequence[str | os.PathLike]) -> list[tuple[int, torch.Tensor]]:
    """(probe index, image) for each output file, the index read from its name (`probe-NN`)."""
    found = []
    for f in image_files.image_files(list(paths)):
        match = _NUMBER.search(f.stem)
        if match is None:
            raise BadInput(f"{f}: cannot tell which probe this output answers: name outputs as the probes "
                           "were named (probe-00.png, ...)")
        found.append((int(match.group(1)), image_files.from_pixels(image_files.read_image(f))))
    return found


def run_model(run: Run, reg: Registry, master: str) -> list[tuple[int, torch.Tensor]]:
    """A model in memory run on the master's probes, its outputs on the 8-bit grid (as files hold them)."""
    x = probes(reg, master)
    with torch.no_grad():
        y = run(x)
    if not isinstance(y, torch.Tensor) or y.shape[0] != len(x):
        raise BadInput(f"the model answered {getattr(y, 'shape', type(y))} to {len(x)} probes")
    return [(i, image_files.quantize(y[i].float())) for i in range(len(x))]


def trace_images(
    outputs: Outputs | Sequence[str | os.PathLike],
    reg: Registry,
    master: str | None = None,
    max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE,
    name: str = "",
    pending: Sequence[Buyer] = (),
    log: bool = True,
    reader: Reader | None = None,
) -> TraceResult:
    """Trace output images (files, or (probe index, tensor) pairs); the same verdicts, bound and exit
    codes as `trace`. `pending` buyers count as issued (a copy's self-check, with `log=False`); `reader`:
    `master`'s, made once by a caller that checks many copies (`master_reader`), else built here."""
    if not 0.0 < max_false_positive < 1.0:
        raise BadArgument("max_false_positive", f"{max_false_positive}: use a probability between 0 and 1")
    if outputs and not isinstance(outputs[0], tuple):
        name = name or ", ".join(map(str, outputs))
        outputs = read_outputs(outputs)
    if not outputs:
        raise BadInput("no output images to read")
    found = masters(reg, master)
    if not found:
        result = TraceResult(UNKNOWN_MASTER, name, reason="no registered master carries an output-image mark")
    else:
        result = None
        for m in found:
            r = _trace_master(outputs, reg, m, max_false_positive / len(found), name, pending,
                              reader if master else None)
            if r.verdict in (IDENTIFIED, COLLUDERS):
                r.union_over(len(found))
                result = r
                break
            result = result or r
    if log:
        buyer = result.buyer["id"] if result.buyer else None
        reg.log_query(name, "images", len(outputs), result.verdict, result.master, buyer,
                      [c["id"] for c in result.colluders])
    return result


def master_reader(reg: Registry, m: Master, model: torch.nn.Module | None = None) -> Reader:
    """What reading `m`'s mark needs (its outputs on the probes, the keyed directions); `model`: the
    master already built, else built here (0.2 s of a 0.74 s copy's issue when built for each copy)."""
    model = model if model is not None else modelio.build(m)[0]
    return Reader.of(model, m.config.schemes[NAME], reg.key(m.name), reg.stored(m))


def _trace_master(outputs: Outputs, reg: Registry, m: Master, max_fp: float, name: str,
                  pending: Sequence[Buyer], reader: Reader | None) -> TraceResult:
    key = reg.key(m.name)
    reader = reader if reader is not None else master_reader(reg, m)
    soft, largest = reader.soft_bits(outputs)
    spec = m.config.code
    result = TraceResult(NO_WATERMARK, name, master=m.name, bits=spec.bits, bits_missing=0, queries=len(outputs))
    if largest < 0.25 / 255:  # equal on the 8-bit grid
        result.reason = "the images equal the master's outputs: this is the unmarked master"
        return result
    verdict(result, soft, key, m.name, spec, Issued(reg, m.name, pending), max_fp)
    return named_by_score(result)


def file_model(path: str | os.PathLike, reg: Registry, master: str) -> Run:
    """A model file (weights the master's factory builds, or ONNX) as a function of probes."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(np.asarray(session.run(None, {name: x.numpy()})[0]))
    m = reg.master(master)
    model, _ = modelio.build(m)
    state = {k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(path).items()}
    modelio.load_into(model, state, f"{path}: weights do not fit {m.factory}")
    return model.eval()


__all__ = ["PROBE_NAME", "file_model", "probes", "read_outputs", "run_model", "trace_images", "write_probes"]
