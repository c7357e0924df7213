import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wmtrace import example, fidelity
from wmtrace.data import load_fashion_mnist
from wmtrace.errors import BadInput


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("example") / "sub" / "master.safetensors"
    seen = []
    metrics = example.train_master(path, epochs=1, limit=4000, seed=0, progress=lambda s, t: seen.append((s, t)))
    return path, metrics, seen


def test_train_master_learns_and_saves(trained):
    path, metrics, seen = trained
    steps = 4000 // 64
    assert metrics["steps"] == steps and metrics["epochs"] == 1 and metrics["seconds"] > 0
    assert seen == [(s, steps) for s in range(1, steps + 1)]
    assert metrics["test_accuracy"] > 0.6
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind

    model = example.build()
    model.load_state_dict(load_file(path), strict=True)
    x, y = load_fashion_mnist("test")
    assert fidelity.evaluate(model, x, y) == pytest.approx(metrics["test_accuracy"], abs=1e-6)

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "wmtrace.example:build"
    assert meta["epochs"] == "1" and meta["seed"] == "0"
    assert float(meta["test_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def test_train_master_is_reproducible(trained, tmp_path):
    path, metrics, _ = trained
    again = example.train_master(tmp_path / "again.safetensors", epochs=1, limit=4000, seed=0)
    assert again["test_accuracy"] == metrics["test_accuracy"]
    a, b = load_file(path), load_file(tmp_path / "again.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nothing_to_train(tmp_path):
    with pytest.raises(BadInput, match="nothing to train"):
        example.train_master(tmp_path / "m.safetensors", epochs=1, limit=10)


def test_build_and_dataset():
    model = example.build()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert set(example.build().state_dict()) == set(model.state_dict())
    assert any(k.endswith("running_mean") for k in model.state_dict())
    ds = example.dataset("test")
    assert len(ds) == 10000 and ds[0][0].shape == (1, 28, 28)


def test_agreement(trained):
    path, _, _ = trained
    model = example.build()
    model.load_state_dict(load_file(path))
    x, _ = load_fashion_mnist("test", limit=2000)
    assert fidelity.agreement(model, model, x) == 1.0

    perturbed = example.build()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * p.std())
    assert fidelity.agreement(model, perturbed, x) < 1.0
