"""Serving attacks (`wmtrace.attacks.serve`), each on its own: preprocessing moves images by a bounded
amount and keeps their shape, screening answers flagged inputs at random and natural ones truly, the
ensemble averages probabilities, top-1 is the reveal; declarations are found beside the weight attacks."""

import numpy as np
import pytest
import torch

from wmtrace import attacks, example
from wmtrace.attacks import ATTACKS, SERVING_ATTACKS
from wmtrace.attacks.serve_preprocess import preprocess
from wmtrace.attacks.serve_screen import statistics
from wmtrace.data import MEAN, STD, load_fashion_mnist
from wmtrace.errors import BadArgument, BadInput
from wmtrace.formats import export_onnx, save_safetensors

GRAY = 1 / (255 * STD)  # one gray level in normalised units


@pytest.fixture(scope="module")
def images():
    x, y = load_fashion_mnist("test", limit=2000)
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def nearest_mean(images):
    """A classifier with real confidence structure and no training: logits are minus the squared
    distance to each class's mean image (from the last 1000 images), at a temperature."""
    x, y = images
    means = np.stack([x[1000:][y[1000:] == c].mean(0).ravel() for c in range(10)])

    def predict(q: np.ndarray) -> np.ndarray:
        flat = np.asarray(q, dtype=np.float64).reshape(len(q), -1)
        d = (flat**2).sum(1, keepdims=True) - 2 * flat @ means.T + (means**2).sum(1)
        return (-d / 40.0).astype(np.float32)

    return predict


def blends(x: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Boundary-like queries: half-and-half blends of two images of different classes."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(x), (2, 4 * n))
    keep = y[i] != y[j]
    i, j = i[keep][:n], j[keep][:n]
    return (0.5 * x[i] + 0.5 * x[j]).astype(np.float32)


def test_serving_attacks_are_found_beside_weight_attacks():
    assert sorted(SERVING_ATTACKS) == ["ensemble", "preprocess", "screen", "top1"]
    assert {"finetune", "prune", "quantize", "distill"} <= set(ATTACKS)  # weight attacks still found
    assert not set(SERVING_ATTACKS) & set(ATTACKS)  # the CLI's commands come from ATTACKS alone
    assert SERVING_ATTACKS["ensemble"].merges and SERVING_ATTACKS["screen"].needs_data
    assert SERVING_ATTACKS["top1"].reveal == "top1" and SERVING_ATTACKS["preprocess"].reveal is None


def test_preprocess_moves_images_a_bounded_amount_and_keeps_their_shape(images):
    x = images[0][:200]
    for size, mean_bound in ((0, 6), (24, 16)):  # gray levels: JPEG alone, JPEG after resizing to 24 and back
        out = preprocess(x, size=size, quality=75)
        assert out.shape == x.shape and out.dtype == np.float32
        change = np.abs(out - x) / GRAY
        assert 0.5 < change.mean() < mean_bound, (size, change.mean())
        assert out.min() >= -MEAN / STD - 1e-5 and out.max() <= (1 - MEAN) / STD + 1e-5  # still pixels
    flat = preprocess(x[:, 0], size=24)  # (n, H, W) images too
    assert flat.shape == (200, 28, 28)
    np.testing.assert_allclose(flat, preprocess(x, size=24)[:, 0])
    with pytest.raises(BadInput, match="not images"):
        preprocess(np.zeros((3, 784), np.float32))
    with pytest.raises(BadInput, match="quality 0"):
        preprocess(x[:1], quality=0)


def test_preprocess_wrap_feeds_the_model_the_processed_images(images):
    x = images[0][:20]
    seen = []
    predict = attacks.serve("preprocess", [lambda q: seen.append(q) or np.zeros((len(q), 10), np.float32)])
    assert predict(x).shape == (20, 10)
    np.testing.assert_array_equal(seen[0], preprocess(x, 24, 75))
    with pytest.raises(BadArgument, match="quality must be a whole number"):
        attacks.serve("preprocess", [lambda q: q], quality="high")


def test_screen_answers_natural_inputs_truly_and_flagged_ones_at_random(images, nearest_mean):
    x, y = images
    predict = attacks.serve("screen", [nearest_mean], x[:1000], fraction=0.05)
    held_out = x[1000:]
    truth = nearest_mean(held_out)
    got = predict(held_out)
    same = (got == truth).all(1)
    assert 0.88 < same.mean() <= 1.0  # about 95% of natural inputs answered by the model itself
    changed = got[~same]
    np.testing.assert_allclose(np.log(np.exp(changed.astype(np.float64)).sum(1)), 0, atol=1e-5)  # log-probabilities
    queries = blends(x, y, 500)
    z = predict(queries)
    flagged = ~(z == nearest_mean(queries)).all(1)
    assert flagged.mean() > 2 * (1 - same.mean())  # hesitant blends are flagged far more often than natural inputs
    labels = z[flagged].argmax(1)
    assert len(np.unique(labels)) == 10  # random classes, not the model's
    assert (labels == nearest_mean(queries)[flagged].argmax(1)).mean() < 0.3
    again = predict(queries)
    assert (again[flagged] != z[flagged]).any()  # redrawn per call: asking twice does not reveal the answer


def test_screen_by_image_statistics_flags_blends(images, nearest_mean):
    x, y = images
    predict = attacks.serve("screen", [nearest_mean], x[:1000], fraction=0.05, detector="statistics")
    natural_flagged = ~(predict(x[1000:]) == nearest_mean(x[1000:])).all(1)
    queries = blends(x, y, 500)
    query_flagged = ~(predict(queries) == nearest_mean(queries)).all(1)
    assert natural_flagged.mean() < 0.12 and query_flagged.mean() > natural_flagged.mean()
    assert statistics(x[:5]).shape == (5, 4)


def test_screen_needs_data_and_checks_its_parameters(images, nearest_mean):
    x = images[0]
    with pytest.raises(BadInput, match="natural inputs"):
        attacks.serve("screen", [nearest_mean])
    with pytest.raises(BadInput, match="strength 1.5 must be a fraction"):
        attacks.serve("screen", [nearest_mean], x[:100], fraction=1.5)
    with pytest.raises(BadArgument, match="detector"):
        attacks.serve("screen", [nearest_mean], x[:100], detector="magic")


def test_ensemble_averages_the_copies_probabilities():
    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    b = np.log(np.array([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])) + 5.0  # logits up to a constant per row
    predict = attacks.serve("ensemble", [lambda q: a, lambda q: b])
    np.testing.assert_allclose(np.exp(predict(np.zeros((2, 1)))), [[0.4, 0.5, 0.1], [0.15, 0.15, 0.7]], atol=1e-6)
    with pytest.raises(BadInput, match="at least two copies"):
        attacks.serve("ensemble", [lambda q: a])
    with pytest.raises(BadInput, match="serves one copy, not 2"):
        attacks.serve("preprocess", [lambda q: a, lambda q: b])


def test_top1_is_the_reveal_mode_on_the_copy_as_it_is():
    def same(q):
        return q

    assert attacks.serve("top1", [same]) is same
    assert attacks.serve_attack("top1").reveal == "top1"
    with pytest.raises(BadInput, match="unknown serving attack 'jpeg'"):
        attacks.serve_attack("jpeg")


def test_served_copies_from_safetensors_and_onnx_answer_alike(tmp_path, images):
    torch.manual_seed(0)
    models = [example.build().eval() for _ in range(2)]
    files = []
    for i, m in enumerate(models):
        save_safetensors(m.state_dict(), tmp_path / f"c{i}.safetensors")
        files.append(tmp_path / f"c{i}.safetensors")
    export_onnx(models[0], torch.randn(2, 1, 28, 28), tmp_path / "c0.onnx")
    x = images[0][:50]
    with torch.no_grad():
        expected = models[0](torch.from_numpy(x)).numpy()
    torch_predict, reveal = attacks.served([files[0]], "wmtrace.example:build")
    assert reveal is None
    np.testing.assert_allclose(torch_predict(x), expected, atol=1e-4)
    onnx_predict, _ = attacks.served([tmp_path / "c0.onnx"])
    np.testing.assert_allclose(onnx_predict(x), expected, atol=1e-4)
    both, _ = attacks.served(files, "wmtrace.example:build", "ensemble")
    with torch.no_grad():
        mean = np.mean([torch.softmax(m(torch.from_numpy(x)), 1).numpy() for m in models], 0)
    np.testing.assert_allclose(np.exp(both(x)), mean, atol=1e-5)
    _, forced = attacks.served([files[0]], "wmtrace.example:build", "top1")
    assert forced == "top1"
    with pytest.raises(BadInput, match="merging serving attack"):
        attacks.served(files, "wmtrace.example:build")
