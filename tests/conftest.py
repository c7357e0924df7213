"""Shared fixtures: one small real master (Fashion-MNIST slice), a registry with a few buyers."""

import shutil
from pathlib import Path

import pytest
import torch

from wmtrace import api, example

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def master_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("master") / "fashion_small.safetensors"
    example.train_master(path, epochs=1, limit=6000, seed=0)
    return path


@pytest.fixture(scope="session")
def other_master_file(tmp_path_factory) -> Path:
    """Same architecture, trained independently (other seed): not ours."""
    path = tmp_path_factory.mktemp("other") / "independent.safetensors"
    example.train_master(path, epochs=1, limit=6000, seed=1)
    return path


@pytest.fixture(scope="session")
def issued(tmp_path_factory, master_file):
    """A registry with one master and three issued buyers; tests copy it before writing to it."""
    root = tmp_path_factory.mktemp("issued")
    reg = api.open_registry(root / "registry", create=True)
    api.init(reg, "small", master_file, "wmtrace.example:build", data="tests.smalldata:dataset",
             fidelity_target=0)  # a weak master: its copies are not the subject here
    buyers = api.issue(reg, buyers=3, out=root / "out")
    reg.close()
    return root, buyers


@pytest.fixture
def workdir(tmp_path, issued) -> Path:
    """A private copy of the issued registry and files."""
    root, _ = issued
    shutil.copytree(root, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


@pytest.fixture(scope="session")
def crowd(tmp_path_factory, issued):
    """The issued registry grown to eight buyers, for merging copies; tests must not write to it."""
    src, _ = issued
    root = tmp_path_factory.mktemp("crowd")
    shutil.copytree(src, root, dirs_exist_ok=True, symlinks=True)
    reg = api.open_registry(root / "registry")
    api.issue(reg, buyers=5, out=root / "more")
    buyers = reg.buyers("small")
    reg.close()
    return root, buyers
