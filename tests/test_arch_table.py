"""bench/arch_table.py's pure helpers: which runs, which options, which subsets, and that its
"untrained" network is the one training started from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from retrieval.training.loop import _Run
from retrieval.training.prepare import RunOptions
from retrieval.training.recipes import make_recipe
from tests.corpus import make_labelled_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from arch_table import (
    RunSpec,
    capped,
    parse_only,
    table_rows,
    train_options,
    untrained,
)


def test_only_names_one_dataset_and_one_arch_and_refuses_others() -> None:
    assert parse_only("small:paper-groups2") == RunSpec("small", "paper-groups2")
    assert parse_only("fashion:cifar").name == "fashion-cifar"
    for bad in ("small", "small:resnet", "cifar10:paper", ":paper"):
        with pytest.raises(SystemExit, match="DATASET:ARCH"):
            parse_only(bad)


def test_small_folder_runs_add_only_the_image_size_and_the_arch_options() -> None:
    assert train_options(RunSpec("small", "torchvision"), "3m") == ["--image-size", "64"]
    cifar = ["--image-size", "32", "--arch", "cifar"]
    assert train_options(RunSpec("small", "cifar"), "3m") == cifar
    assert train_options(RunSpec("imagenette", "paper-groups2"), "3m") == [
        "--time-budget",
        "3m",
        "--arch",
        "paper",
        "--groups",
        "2",
    ]
    assert train_options(RunSpec("fashion", "torchvision-bn"), "2m") == [
        "--time-budget",
        "2m",
        "--batch-norm",
    ]


def test_capped_is_a_seeded_stratified_subset_or_none() -> None:
    labels = torch.arange(10).repeat(60)  # 600 labels, 60 per class
    keep = capped(labels, 200)
    assert keep is not None and len(keep) == 200
    assert torch.bincount(labels[keep]).tolist() == [20] * 10
    assert torch.equal(keep, capped(labels, 200))
    assert capped(labels, 0) is None and capped(labels, 600) is None


def test_table_shows_trained_untrained_and_pixels_and_says_when_a_run_failed() -> None:
    rows = {
        "trained fc7": {"top1": 0.5, "precision@6": 0.444, "map": 0.383},
        "untrained fc7": {"top1": 0.1, "precision@6": 0.197, "map": 0.142},
        "raw pixels": {"top1": None, "precision@6": 0.2, "map": 0.155},
    }
    good = {
        "dataset": "small",
        "arch": "torchvision",
        "train_seconds": 301.4,
        "load_average_before": [1.2, 1.0, 1.0],
        "load_average_after": [2.1, 1.5, 1.0],
        "recipe": {"steps": 992, "batch_size": 32, "image_size": 64},
        "rows": rows,
    }
    bad = {"dataset": "fashion", "arch": "paper", "error": "training diverged", "returncode": 1}
    head, rule, first, second = table_rows([good, bad])
    assert head.count("|") == rule.count("|") == first.count("|") == second.count("|")
    assert "| small | torchvision | 301 s | 1.2→2.1 | 992×32 @64 px | 0.500 |" in first
    assert "**0.444** | 0.197 | 0.200 | **0.383** | 0.142 | 0.155 |" in first
    assert "failed: training diverged" in second


def test_untrained_is_the_network_training_starts_from(tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    make_labelled_folder(folder, classes=3, per_class=8, size=64)
    for arch, extra in (("paper", {}), ("torchvision", {"batch_norm": True})):
        recipe = make_recipe(arch=arch, image_size=64, **extra)
        run = _Run(folder, tmp_path / f"{arch}.pt", recipe, RunOptions(workers=0))
        start = untrained(run.recipe, folder, run.prep, 3, 3)
        for name, value in run.model.state_dict().items():
            torch.testing.assert_close(start.state_dict()[name], value, msg=name)
