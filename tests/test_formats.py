"""Weight files read without model code: every layout a leaked model arrives in."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from wmtrace import formats
from wmtrace.errors import BadInput


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def test_bf16_and_fp16_become_float32(tmp_path, net):
    sd = net.state_dict()
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items() if v.is_floating_point()}, tmp_path / "m.safetensors")
    got = formats.load_tensors(tmp_path / "m.safetensors")
    assert got["0.weight"].dtype == np.float32
    np.testing.assert_allclose(got["0.weight"], sd["0.weight"].numpy(), rtol=1e-2, atol=1e-2)
    assert "1.num_batches_tracked" not in got  # integer buffers are not weights


def test_sharded_index_and_folder(tmp_path, net):
    sd = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, tmp_path / file)
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for source in (tmp_path, tmp_path / "model.safetensors.index.json"):
        got = formats.load_tensors(source)
        assert set(got) == set(sd)
        np.testing.assert_array_equal(got["4.weight"], sd["4.weight"].numpy())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BadInput, match="missing"):
        formats.load_tensors(tmp_path / "model.safetensors.index.json")


def test_nested_checkpoint(tmp_path, net):
    torch.save({"model_state_dict": net.state_dict(), "epoch": 7, "optimizer": {}}, tmp_path / "c.ckpt")
    got = formats.load_tensors(tmp_path / "c.ckpt")
    np.testing.assert_array_equal(got["0.weight"], net.state_dict()["0.weight"].numpy())


def test_onnx_constant_nodes_and_quantized_weights(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    q = np.array([[1, -2], [3, 4]], dtype=np.int8)
    scale = np.array([0.5, 0.25], dtype=np.float32)
    deq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wq"], axis=0)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [const, deq, mm], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(np.zeros(2, np.int8), "z")],
    )
    onnx.save(helper.make_model(graph), tmp_path / "c.onnx")
    got = formats.load_tensors(tmp_path / "c.onnx")
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_allclose(got["q"], q.astype(np.float32) * scale[:, None])


def test_onnxruntime_quantized_model_dequantizes_close_to_original(tmp_path, net):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    formats.export_onnx(net, torch.zeros(1, 3, 8, 8), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    got = formats.load_tensors(tmp_path / "q.onnx")
    head = net.state_dict()["4.weight"].numpy()
    match = [a for a in got.values() if a.shape in (head.shape, head.T.shape)]
    assert match, "quantized Linear weight not recovered"
    a = match[0] if match[0].shape == head.shape else match[0].T
    assert np.abs(a - head).max() <= np.abs(head).max() / 100


def test_unknown_bytes_and_empty_folder(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x42" * 100)
    with pytest.raises(BadInput):
        formats.load_tensors(tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no single model file"):
        formats.load_tensors(tmp_path / "empty")


def test_save_is_atomic_and_reports_unwritable(tmp_path):
    formats.save_safetensors({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind
    with pytest.raises(BadInput, match="cannot write"):
        formats.save_safetensors({"a": np.ones(3, np.float32)}, tmp_path / "missing-dir" / "a.safetensors")
