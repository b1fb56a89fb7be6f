"""Training: data layouts, a tiny run, checkpoints that describe themselves, exact --resume."""

from __future__ import annotations

import gzip
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from retrieval.errors import DataError, WeightsError
from retrieval.model.weights import load_model, read_checkpoint
from retrieval.training.datasets import open_training_data, stratified_split
from retrieval.training.idx_files import FASHION_MNIST_CLASSES
from retrieval.training.imagesets import FileImages
from retrieval.training.loop import train
from retrieval.training.prepare import RunOptions
from retrieval.training.recipes import build_model, make_recipe
from tests.corpus import make_labelled_folder

SIZE = 64  # AlexNet's smallest convenient input (it needs >= 63 px)


def write_idx(folder: Path, train: int = 40, test: int = 20, seed: int = 0) -> Path:
    """The four gzipped idx files of a 10-class, 28x28 data set (class = brightness band)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 20, (n, 28, 28)) + labels[:, None, None] * 23
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">iiii", 2051, n, 28, 28) + images.astype(np.uint8).tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">ii", 2049, n) + labels.tobytes())
    return folder


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """train/ and val/ folders of three classes of coloured shapes."""
    make_labelled_folder(tmp_path / "shapes" / "train", classes=3, per_class=6, size=48)
    make_labelled_folder(tmp_path / "shapes" / "val", classes=3, per_class=2, size=48)
    return tmp_path / "shapes"


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def test_tiny_training_run_writes_a_checkpoint_index_can_use(shapes: Path, tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    out = tmp_path / "model.pt"
    args = ["train", str(shapes), "-o", str(out), "--image-size", str(SIZE), "--epochs", "2"]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "6", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["finished"] and summary["epochs"] == 2

    loaded = load_model(out)
    assert loaded.classes == ["circles", "squares", "stripes"]
    prep = loaded.preprocessing
    assert (prep.resize, prep.crop, prep.channels) == (73, SIZE, 3)
    assert prep.mean != (0.485, 0.456, 0.406)  # computed on the training images
    assert loaded.metadata["recipe"]["name"] == "onecycle" and loaded.metadata["epoch"] == 2
    checkpoint = read_checkpoint(out)
    assert "train_state" not in checkpoint  # a finished run keeps no optimizer

    rows = [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    keys = ("train_loss", "top1_error", "precision@6", "map", "seconds")
    for key in (*keys, "images_per_second"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert not any("top5_error" in r for r in rows)  # 3 classes: top-5 always right
    assert all(0 < r["map"] <= 1 and 0 <= r["precision@6"] <= 1 for r in rows)
    assert checkpoint["metrics"] == rows  # the checkpoint keeps the same rows
    best = max(rows, key=lambda r: r["map"])
    assert checkpoint["best"] == {"epoch": best["epoch"], "select": "map", "score": best["map"]}
    assert summary["best"]["epoch"] == best["epoch"]

    index = tmp_path / "index"
    result = CliRunner().invoke(
        cli, ["index", str(shapes / "val"), "--index", str(index), "--weights", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["model"]["preprocessing"]["crop"] == SIZE


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(shapes: Path, tmp_path: Path) -> None:
    # OneCycle steps its schedule every batch, so stopping mid-epoch tests the most state.
    recipe = make_recipe("onecycle", image_size=SIZE, epochs=2, batch_size=9)  # 2 steps/epoch
    whole = train(shapes, tmp_path / "whole.pt", recipe, RunOptions(workers=0))
    assert whole.finished

    stopped = train(shapes, tmp_path / "cut.pt", recipe, RunOptions(workers=0, max_steps=3))
    assert not stopped.finished and read_checkpoint(tmp_path / "cut.pt")["step"] == 1
    resumed = train(shapes, tmp_path / "cut.pt", recipe, RunOptions(workers=0, resume=True))
    assert resumed.finished

    a, b = _state(tmp_path / "whole.pt"), _state(tmp_path / "cut.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    log_lines = (tmp_path / "cut.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log_lines] == [1, 2]


def test_resume_without_a_checkpoint_or_after_the_end_is_refused(
    shapes: Path, tmp_path: Path
) -> None:
    recipe = make_recipe("paper", image_size=SIZE, epochs=1, batch_size=18)
    with pytest.raises(WeightsError, match="no checkpoint"):
        train(shapes, tmp_path / "none.pt", recipe, RunOptions(workers=0, resume=True))
    train(shapes, tmp_path / "done.pt", recipe, RunOptions(workers=0))
    with pytest.raises(WeightsError, match="finished"):
        train(shapes, tmp_path / "done.pt", recipe, RunOptions(workers=0, resume=True))


def test_a_fresh_run_does_not_write_over_a_file_at_its_output(shapes: Path, tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    out = tmp_path / "model.pt"
    args = ["train", str(shapes), "-o", str(out), "--image-size", str(SIZE), "--workers", "0"]
    assert CliRunner().invoke(cli, [*args, "--epochs", "1"]).exit_code == 0
    trained = out.read_bytes()
    again = CliRunner().invoke(cli, [*args, "--epochs", "1"])
    assert again.exit_code == 1 and out.read_bytes() == trained  # untouched
    assert "a finished run's checkpoint (1 epoch)" in again.stderr
    assert "--finetune" in again.stderr and "--overwrite" in again.stderr

    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    refused = CliRunner().invoke(cli, [*args[:2], "-o", str(notes), "--epochs", "1"])
    assert refused.exit_code == 1 and notes.read_text() == "my notes"
    assert "not a checkpoint" in refused.stderr and "--finetune" not in refused.stderr

    cut = tmp_path / "cut.pt"
    stop = [*args[:2], "-o", str(cut), "--image-size", str(SIZE), "--workers", "0"]
    assert CliRunner().invoke(cli, [*stop, "--epochs", "2", "--max-steps", "1"]).exit_code == 0
    unfinished = CliRunner().invoke(cli, [*stop, "--epochs", "2"])
    assert unfinished.exit_code == 1 and "continue it with --resume" in unfinished.stderr
    assert CliRunner().invoke(cli, [*stop, "--resume"]).exit_code == 0

    replaced = CliRunner().invoke(cli, [*args, "--epochs", "2", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert read_checkpoint(out)["epoch"] == 2


def test_idx_files_are_detected_as_a_one_channel_data_set(tmp_path: Path) -> None:
    data = open_training_data(write_idx(tmp_path / "fashion-mnist"))
    assert (data.source, data.channels, data.val_name) == ("idx", 1, "test")
    assert (len(data.train), len(data.val)) == (40, 20)
    assert data.classes == FASHION_MNIST_CLASSES
    digits = open_training_data(write_idx(tmp_path / "other"), val_fraction=0.25)
    assert digits.classes == [str(i) for i in range(10)]
    assert (len(digits.train), len(digits.val)) == (30, 10)


def test_a_one_channel_model_trains_on_idx_files(tmp_path: Path) -> None:
    data = write_idx(tmp_path / "fashion-mnist", train=20, test=10)
    recipe = make_recipe("onecycle", image_size=SIZE, epochs=1, batch_size=10)
    result = train(data, tmp_path / "m.pt", recipe, RunOptions(workers=0))
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.args.in_channels == 1 and loaded.preprocessing.channels == 1
    assert loaded.classes == FASHION_MNIST_CLASSES
    assert result.history[0]["top5_error"] <= 1.0


def test_a_broken_idx_file_is_one_clear_error(tmp_path: Path) -> None:
    folder = write_idx(tmp_path / "fm")
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 2049, 99) + bytes(5))
    with pytest.raises(DataError, match="header says"):
        open_training_data(folder)


def test_bad_image_files_are_skipped_with_a_warning(shapes: Path, caplog) -> None:
    (shapes / "train" / "circles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = open_training_data(shapes)
    assert isinstance(data.train, FileImages) and len(data.train) == 19
    with caplog.at_level(logging.WARNING):
        in_memory = data.train.in_memory(73)
        streamed = list(data.train.batches(torch.arange(19), 8, 73))
    assert len(in_memory) == 18
    assert sum(len(labels) for _, labels in streamed) == 18
    assert "broken.png" in caplog.text


def test_a_class_folder_without_images_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    """An empty folder (or one of notes) beside the classes is no class: a model would get an
    output no example ever asks for."""
    make_labelled_folder(tmp_path / "all", classes=2, per_class=5, size=32)
    (tmp_path / "all" / "empty").mkdir()
    (tmp_path / "all" / "notes").mkdir()
    (tmp_path / "all" / "notes" / "readme.txt").write_text("not a picture")
    with caplog.at_level(logging.WARNING):
        data = open_training_data(tmp_path / "all")
    assert "empty" not in data.classes and "notes" not in data.classes
    assert len(data.classes) == 2 and len(data.train) + len(data.val) == 10
    assert "empty, notes" in caplog.text


def test_one_folder_of_classes_is_split_stratified_and_seeded(tmp_path: Path) -> None:
    make_labelled_folder(tmp_path / "all", classes=3, per_class=10, size=32)
    a = open_training_data(tmp_path / "all", val_fraction=0.2, seed=1)
    b = open_training_data(tmp_path / "all", val_fraction=0.2, seed=1)
    assert a.val.paths == b.val.paths and len(a.val) == 6
    assert torch.bincount(a.val.labels).tolist() == [2, 2, 2]
    assert not set(a.val.paths) & set(a.train.paths)
    train_idx, val_idx = stratified_split(torch.tensor([0, 0, 1, 1, 1, 1]), 0.5, seed=0)
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(6))


def test_finetune_starts_from_torchvisions_imagenet_weights(tmp_path: Path) -> None:
    import os

    import torchvision

    recipe = make_recipe("paper", finetune="imagenet", freeze="features", image_size=SIZE)
    assert recipe.lr == pytest.approx(0.001)
    with pytest.raises(WeightsError):  # offline with an empty cache: says so
        build_model(recipe, 3, 3)
    state = torchvision.models.alexnet().state_dict()
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / Path(url).name
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache)

    model = build_model(recipe, 3, 3)
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    assert torch.equal(model.classifier[4].weight, state["classifier.4.weight"])
    assert model.classifier[6].out_features == 3
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    grey = build_model(recipe, 3, 1)
    assert torch.allclose(grey.features[0].weight, state["features.0.weight"].sum(1, True))


@pytest.mark.cuda
def test_cuda_training_uses_bf16_autocast_and_channels_last(shapes: Path, tmp_path: Path) -> None:
    recipe = make_recipe("onecycle", image_size=SIZE, epochs=1, batch_size=6)
    result = train(shapes, tmp_path / "gpu.pt", recipe, RunOptions(device="cuda", workers=0))
    assert result.finished and np.isfinite(result.history[0]["train_loss"])
    assert load_model(tmp_path / "gpu.pt").model.features[0].weight.device.type == "cpu"


def test_demo_trains_indexes_and_draws_figure_4_from_idx_files(tmp_path: Path) -> None:
    from retrieval.cli.main import cli
    from retrieval.demo import run_demo

    data = write_idx(tmp_path / "fashion-mnist", train=30, test=10)
    report = run_demo(data, tmp_path / "out", epochs=1, device="cpu")
    assert report.test_images == 10 and 0 <= report.top1 <= 1
    assert 0 <= report.precision_at_6 <= 1
    assert Path(report.grid).exists()
    pngs = sorted((tmp_path / "out" / "fashion-mnist" / "train").rglob("*.png"))
    assert len(pngs) == 30 and pngs[0].parent.name == "Ankle boot"
    assert (tmp_path / "out" / "fashion-mnist" / "train" / "T-shirt_top").is_dir()

    queries = tmp_path / "out" / "fashion-mnist" / "test"
    args = ["evaluate", str(queries), "--retrieval", "--index", report.index_dir, "--json"]
    result = CliRunner().invoke(cli, [*args, "-k", "3"])
    assert result.exit_code == 0, result.output
    quality = json.loads(result.stdout)
    assert quality["queries"] == 10 and 0 <= quality["precision@3"] <= 1
