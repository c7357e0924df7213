"""A model file on disk queried as a black box: executed, never inspected by the tracer.

An `.onnx` file runs in onnxruntime (CPU; its first input and first output unless named). Any other
weight file (safetensors, a checkpoint) is loaded into the module a factory builds, through wmtrace's
own readers (`formats.open_tensors`: budgeted, `torch.load(weights_only=True)` only), so a hostile file
can neither run code nor exhaust memory by what it declares. The model's full outputs are then cut
down to what a deployment revealing `reveal` would answer (`base.simulate`): the same file answers
as an endpoint with scores, top-k or top-1 would, which is how the black-box scheme is tested
without a server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import formats
from ..errors import BadArgument, BadInput, TargetFailed, first_line
from ..modelio import import_object, load_into
from .base import Answers, Closing, Queries, simulate

ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class _Local(Closing):
    """What ONNX and torch targets share: batching, reveal simulation, counting."""

    def __init__(self, path: Path, reveal: str | None, k: int, decimals: int | None, batch: int) -> None:
        self.name, self.reveal, self.k, self.decimals, self.batch = str(path), reveal or "scores", k, decimals, batch
        self.queries = 0

    def answer(self, inputs: Queries) -> Answers:
        """Answers to `inputs` (a numeric array, n first), as the reveal mode allows."""
        if not isinstance(inputs, np.ndarray) or inputs.dtype.kind not in "fiu" or inputs.ndim < 1:
            raise BadArgument("inputs", f"must be a numeric array for {self.name}")
        full = self.outputs(inputs)
        if full.ndim != 2 and self.reveal != "embedding":
            raise TargetFailed(f"{self.name}: outputs of shape {list(full.shape)}, expected [n, classes]")
        answers = simulate(full, self.reveal, self.k, self.decimals, self.name)
        self.queries += len(inputs)
        return answers

    def outputs(self, inputs: np.ndarray) -> np.ndarray:
        """The model's raw outputs (logits or embeddings), in batches: what `wmtrace serve` serves."""
        outs = [self._run(inputs[i : i + self.batch]) for i in range(0, len(inputs), self.batch)]
        return np.concatenate(outs) if outs else np.zeros((0, 0))

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OnnxTarget(_Local):
    """An ONNX file in an onnxruntime CPU session."""

    def __init__(self, path: Path, *, reveal: str | None, k: int, decimals: int | None, batch: int,
                 input_name: str | None, output_name: str | None) -> None:
        super().__init__(path, reveal, k, decimals, batch)
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for damaged or unsupported files
            raise BadInput(f"{path}: onnxruntime cannot load it ({first_line(e)})") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input = _named(inputs, input_name, "input_name", path)
        self.output = _named(outputs, output_name, "output_name", path).name
        self.dtype = ORT_TYPES.get(self.input.type, np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.output], {self.input.name: np.ascontiguousarray(x, dtype=self.dtype)})[0]
        except Exception as e:
            raise TargetFailed(f"{self.name}: onnxruntime failed ({first_line(e)})") from e
        return np.asarray(out)


class TorchTarget(_Local):
    """A weight file loaded into the module `factory` builds, run in eval mode without gradients."""

    def __init__(self, path: Path, *, factory: str | None, reveal: str | None, k: int, decimals: int | None,
                 batch: int) -> None:
        super().__init__(path, reveal, k, decimals, batch)
        if not factory:
            raise BadArgument("factory", f"is needed to run {path} (module:function building its model)")
        model = import_object(factory)()
        if not isinstance(model, torch.nn.Module):
            raise BadInput(f"{factory} did not return a torch module")
        state = {k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(path).items()}
        load_into(model, state, f"{path}: weights do not fit {factory}")
        self.model = model.eval()

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        except Exception as e:
            raise TargetFailed(f"{self.name}: the model failed on its input ({first_line(e)})") from e
        return out.float().numpy()


class ModuleTarget(_Local):
    """A model already in memory, run as a black box: how `issue` checks that a copy names its buyer
    from its answers alone, and how benchmarks query surrogates they have just trained."""

    def __init__(self, model: torch.nn.Module, name: str, *, reveal: str | None = None, k: int = 5,
                 decimals: int | None = None, batch: int = 512) -> None:
        super().__init__(Path(name), reveal, k, decimals, batch)
        self.name = name
        self.model = model.eval()
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()


def _named(items: list, wanted: str | None, param: str, path: Path):
    if wanted is None:
        return items[0]
    for item in items:
        if item.name == wanted:
            return item
    raise BadArgument(param, f"names nothing in {path} (it has {', '.join(i.name for i in items)})")


def open_local(path: Path, **kw) -> OnnxTarget | TorchTarget:
    """An `.onnx` file in onnxruntime (any factory unused); every other file through the factory."""
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    factory = kw.pop("factory")
    if path.suffix.lower() == ".onnx":
        return OnnxTarget(path, **kw)
    kw.pop("input_name"), kw.pop("output_name")
    return TorchTarget(path, factory=factory, **kw)
