"""Weight files read without model code: every layout a leaked model arrives in, and hostile ones."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file
from torch import nn

from wmtrace import formats
from wmtrace.errors import BadInput


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():  # non-trivial statistics, so folding BatchNorm visibly changes the conv
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return model.eval()


def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _folded_conv(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    conv, bn = model[0], model[1]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * s[:, None, None, None]
    b = (conv.bias - bn.running_mean) * s + bn.bias
    return w.detach().numpy(), b.detach().numpy()


def _by_shape(tensors: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    found = [a for a in tensors.values() if a.shape == shape]
    assert len(found) == 1, f"expected one tensor of shape {shape}, found {len(found)}"
    return found[0]


def _linear_model(path: Path, w: np.ndarray, **save_kwargs) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph), str(path), **save_kwargs)


# --- safetensors -------------------------------------------------------------------------------


def test_safetensors_round_trip_keeps_values_and_metadata(tmp_path, net):
    sd = net.state_dict()
    formats.save_safetensors(sd, tmp_path / "m.safetensors", {"buyer": "7"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    got = formats.load_tensors(tmp_path / "m.safetensors")
    assert set(got) == set(_floats(net))  # integer buffers (num_batches_tracked) are not weights
    for k, v in _floats(net).items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v.numpy())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"buyer": "7"}


def test_extension_is_not_trusted(tmp_path, net):
    formats.save_safetensors(net.state_dict(), tmp_path / "weights.onnx")  # safetensors under a wrong name
    got = formats.load_tensors(tmp_path / "weights.onnx")
    np.testing.assert_array_equal(got["4.weight"], net.state_dict()["4.weight"].numpy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_float_types_become_float32(tmp_path, net, dtype):
    sd = _floats(net)
    save_file({k: v.to(dtype) for k, v in sd.items()}, tmp_path / "m.safetensors")
    got = formats.load_tensors(tmp_path / "m.safetensors")
    assert got["0.weight"].dtype == np.float32
    expected = sd["0.weight"].to(dtype).to(torch.float32).numpy()  # exactly what the file holds
    np.testing.assert_array_equal(got["0.weight"], expected)
    np.testing.assert_allclose(got["0.weight"], sd["0.weight"].numpy(), rtol=1e-2, atol=1e-2)


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 3)
    formats.save_safetensors({"embed": w, "head": w, "view": w[1:]}, tmp_path / "t.safetensors")
    got = load_file(tmp_path / "t.safetensors")
    assert torch.equal(got["embed"], w) and torch.equal(got["head"], w) and torch.equal(got["view"], w[1:])


def test_sharded_index_and_folder(tmp_path, net):
    sd = _floats(net)
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
        for k in sd:
            np.testing.assert_array_equal(got[k], sd[k].numpy())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BadInput, match="missing"):
        formats.load_tensors(tmp_path / "model.safetensors.index.json")


def test_folder_without_index_loads_every_shard(tmp_path, net):
    sd = _floats(net)
    save_file({k: v for k, v in sd.items() if k.startswith("0.")}, tmp_path / "a.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("0.")}, tmp_path / "b.safetensors")
    got = formats.load_tensors(tmp_path)
    assert set(got) == set(sd)


def test_index_shard_outside_its_folder_is_refused(tmp_path, net):
    save_file(_floats(net), tmp_path / "secret.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"0.weight": "../secret.safetensors"}}))
    with pytest.raises(BadInput, match="outside"):
        formats.load_tensors(tmp_path / "m")


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_safetensors(tmp_path, net, cut):
    formats.save_safetensors(net.state_dict(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(BadInput, match="m.safetensors") as err:
        formats.load_tensors(tmp_path / "m.safetensors")
    assert "\n" not in str(err.value)


# --- ONNX --------------------------------------------------------------------------------------


def test_onnx_torchscript_export_folds_batchnorm(tmp_path, net):
    formats.export_onnx(net, torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx", dynamo=False)
    got = formats.load_tensors(tmp_path / "m.onnx")
    np.testing.assert_array_equal(got["4.weight"], net.state_dict()["4.weight"].numpy())
    w, b = _folded_conv(net)
    np.testing.assert_allclose(_by_shape(got, w.shape), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_by_shape(got, b.shape), b, rtol=1e-5, atol=1e-6)
    assert not any("running" in k for k in got)  # no BatchNormalization left


def test_onnx_default_exporter_folds_batchnorm_under_the_conv_names(tmp_path, net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "m.onnx"), verbose=False)
    assert any(p.suffix == ".data" for p in tmp_path.iterdir())  # weights written as external data
    got = formats.load_tensors(tmp_path)  # the folder: the .onnx is its only model file
    w, b = _folded_conv(net)
    np.testing.assert_allclose(got["0.weight"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["0.bias"], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["4.weight"], net.state_dict()["4.weight"].numpy())


def test_onnx_constant_nodes_and_dequantize_linear(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    q = np.array([[1, -2], [3, 4]], dtype=np.int8)
    scale = np.array([0.5, 0.25], dtype=np.float32)
    zero = np.array([1, 0], dtype=np.int8)
    deq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["wq"], axis=0)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [const, deq, mm], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(zero, "z"), numpy_helper.from_array(np.array([1, 3], np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph), tmp_path / "c.onnx")
    got = formats.load_tensors(tmp_path / "c.onnx")
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_allclose(got["q"], (q.astype(np.float32) - zero[:, None]) * scale[:, None])
    assert set(got) == {"w", "q"}  # scale, zero point and the int64 shape tensor are not weights


def test_onnx_bfloat16_initializer(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 2])
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [2, 2], [1.5, -2.0, 0.25, 3.0])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                                  [x], [y], [w])), tmp_path / "b.onnx")
    got = formats.load_tensors(tmp_path / "b.onnx")
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], [[1.5, -2.0], [0.25, 3.0]])


def test_onnx_external_data_inside_its_folder(tmp_path):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    _linear_model(tmp_path / "m.onnx", w, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size == w.nbytes
    np.testing.assert_array_equal(formats.load_tensors(tmp_path / "m.onnx")["w"], w)
    np.testing.assert_array_equal(formats.load_tensors(tmp_path)["w"], w)  # .onnx preferred to weights.bin


def _point_external_data(src: Path, dest: Path, location: str) -> None:
    model = onnx.load(str(src), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(dest))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, where):
    w = np.ones((16, 8), np.float32)
    _linear_model(tmp_path / "m.onnx", w, save_as_external_data=True, location="secret.bin", size_threshold=0)
    (tmp_path / "leak").mkdir()
    location = {"parent": "../secret.bin", "absolute": str(tmp_path / "secret.bin"), "symlink": "link.bin"}[where]
    if where == "symlink":
        os.symlink(tmp_path / "secret.bin", tmp_path / "leak" / "link.bin")
    _point_external_data(tmp_path / "m.onnx", tmp_path / "leak" / "m.onnx", location)
    with pytest.raises(BadInput, match="external data .* outside the model's folder"):
        formats.load_tensors(tmp_path / "leak" / "m.onnx")


def test_onnxruntime_quantized_model_dequantizes_close_to_original(tmp_path, net):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    formats.export_onnx(net, torch.zeros(1, 3, 8, 8), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    got = formats.load_tensors(tmp_path / "q.onnx")
    assert all(a.dtype == np.float32 for a in got.values())
    assert not any(k.endswith(("_scale", "_zero_point")) for k in got)
    head = net.state_dict()["4.weight"].numpy()
    a = _by_shape(got, head.T.shape).T  # MatMulInteger holds the Linear weight transposed
    step = np.abs(head).max(axis=1, keepdims=True) / 127  # one int8 step per output channel
    assert (np.abs(a - head) <= step + 1e-7).all()
    assert not np.array_equal(a, head)  # it really went through int8
    w, _ = _folded_conv(net)
    conv = _by_shape(got, w.shape)
    assert np.abs(conv - w).max() <= np.abs(w).max() / 127 + 1e-7


def test_corrupt_onnx(tmp_path):
    _linear_model(tmp_path / "m.onnx", np.ones((4, 4), np.float32))
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) - 20])
    with pytest.raises(BadInput, match="m.onnx"):
        formats.load_tensors(tmp_path / "m.onnx")


# --- PyTorch checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("zipped", [True, False])
def test_plain_checkpoint(tmp_path, net, zipped):
    torch.save(net.state_dict(), tmp_path / "m.pt", _use_new_zipfile_serialization=zipped)
    got = formats.load_tensors(tmp_path / "m.pt")
    assert set(got) == set(_floats(net))
    for k, v in _floats(net).items():
        np.testing.assert_array_equal(got[k], v.numpy())


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_nested_checkpoint(tmp_path, net, key):
    torch.save({key: net.state_dict(), "epoch": 3, "name": "run-1"}, tmp_path / "c.ckpt")
    got = formats.load_tensors(tmp_path / "c.ckpt")
    assert set(got) == set(_floats(net))
    np.testing.assert_array_equal(got["0.weight"], net.state_dict()["0.weight"].numpy())


def test_deeper_nesting_is_flattened_with_dots(tmp_path, net):
    torch.save({"encoder": {"body": net.state_dict()}, "step": 10}, tmp_path / "c.bin")
    got = formats.load_tensors(tmp_path)  # the folder: the checkpoint is its only model file
    np.testing.assert_array_equal(got["encoder.body.4.weight"], net.state_dict()["4.weight"].numpy())


def test_checkpoint_without_float_tensors(tmp_path):
    torch.save({"epoch": 3, "steps": torch.arange(4)}, tmp_path / "c.pt")
    with pytest.raises(BadInput, match="no floating-point tensors"):
        formats.load_tensors(tmp_path / "c.pt")


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a hostile checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _MyDict(dict):
    pass


@pytest.mark.parametrize("zipped", [True, False])
def test_arbitrary_pickled_objects_are_refused_without_running(tmp_path, net, zipped):
    marker = tmp_path / "pwned"
    evil = _MyDict(net.state_dict())
    evil["hook"] = _Payload(marker)
    torch.save({"state_dict": evil, "epoch": 3}, tmp_path / "evil.pt", _use_new_zipfile_serialization=zipped)
    with pytest.raises(BadInput, match="refusing to unpickle arbitrary objects"):
        formats.load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()
    # Control: the payload is live, so the check above would catch a loader that runs it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# --- errors ------------------------------------------------------------------------------------


def test_random_bytes_missing_and_empty(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8)
    noise[0], noise[8] = 0x42, 0  # no format's magic by chance
    (tmp_path / "x.bin").write_bytes(noise.tobytes())
    with pytest.raises(BadInput, match="x.bin"):
        formats.load_tensors(tmp_path / "x.bin")
    (tmp_path / "pickle.pt").write_bytes(b"\x80" + bytes(range(1, 200)))  # pickle magic, garbage after
    with pytest.raises(BadInput, match="pickle.pt"):
        formats.load_tensors(tmp_path / "pickle.pt")
    with pytest.raises(BadInput, match="no such file"):
        formats.load_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        formats.load_tensors(tmp_path / "e.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no single model file"):
        formats.load_tensors(tmp_path / "empty")


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(BadInput, match="cannot write") as err:
        formats.save_safetensors({"a": np.ones(3, np.float32)}, tmp_path / "missing-dir" / "a.safetensors")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(BadInput, match="cannot write"):
            formats.save_safetensors({"a": np.ones(3, np.float32)}, locked / "a.safetensors")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
