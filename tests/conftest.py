"""Shared fixtures: no network, seeded, small images, a small fast model."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Small crops keep plumbing tests fast; the model itself stays the full-size AlexNet.
SMALL_SIZE = 64


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _offline_and_seeded(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> Iterator[None]:
    """No test reaches a hub: TORCH_HOME is an empty temporary folder, removed after the test
    (weight-cache tests put full checkpoints there: kept, they fill a small CI disk)."""
    torch_home = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv("RETRIEVE_INDEX", raising=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    shutil.rmtree(torch_home, ignore_errors=True)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded full-size AlexNet checkpoint with 64-px preprocessing."""
    from retrieval.model.alexnet import ModelArgs, build_alexnet
    from retrieval.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from retrieval.model.weights import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "small.pt"
    model = build_alexnet(ModelArgs(num_classes=3), seed=0)
    preprocessing = Preprocessing(
        resize=SMALL_SIZE, crop=SMALL_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    save_checkpoint(path, model, preprocessing, classes=["a", "b", "c"])
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A labelled folder: 3 classes x 4 small images."""
    root = tmp_path / "photos"
    from tests.corpus import make_labelled_folder

    make_labelled_folder(root, classes=3, per_class=4, size=48)
    return root


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch) -> Path:
    """Run in an empty current directory (the default index lands in ./.retrieve)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
