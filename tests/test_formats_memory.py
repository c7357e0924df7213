"""Peak memory of `trace` on a legitimate large ONNX file: within twice the file plus 500 MB.

Parsing holds the file's bytes and the parsed protobuf for a moment (twice the file); converting
every tensor to float32 up front added a third copy. On a 200 MB file the trace took 881 MB then
(292 MB of it the same command on a small file), 681 MB with tensors converted only when read.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from safetensors.torch import load_file

from .test_hostile_files import MB, buyer_file, measured_trace, on_disk


def _large_onnx(path: Path, state: dict, decoys: int) -> None:
    """The buyer's weights plus `decoys` float32 tensors of 4 MB shaped like no carrier: never read by trace."""
    inits = [numpy_helper.from_array(v.float().numpy(), k) for k, v in state.items() if v.is_floating_point()]
    rng = np.random.default_rng(0)
    for i in range(decoys):
        inits.append(numpy_helper.from_array(rng.standard_normal((1024, 1024), dtype=np.float32), f"decoy{i}.weight"))
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [], inits)), str(path))


def test_large_onnx_is_traced_within_the_memory_bound(workdir, issued, tmp_path):
    reg = workdir / "registry"
    small = measured_trace(buyer_file(issued), reg)  # what the command itself takes
    (tmp_path / "big").mkdir()
    path = tmp_path / "big" / "m.onnx"
    _large_onnx(path, load_file(buyer_file(issued)), decoys=50)
    size = on_disk(path) / MB
    assert size > 190
    r = measured_trace(path, reg)
    assert r["rc"] == 0, r  # the buyer's weights are in there under their own names
    assert r["maxrss_mb"] <= 2 * size + 500, r
    assert r["maxrss_mb"] - small["maxrss_mb"] <= 2.5 * size, (r, small)  # no float32 copy of unread tensors
