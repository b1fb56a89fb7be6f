"""Classifier evaluation: centre crop as the index sees it, the paper's ten crops, per class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchvision import transforms

from retrieval.evaluation.classifier import evaluate_classifier
from retrieval.images.decode import load_image
from retrieval.model.alexnet import ModelArgs, build_alexnet
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import load_model, save_checkpoint
from retrieval.training.augment import BatchTransform
from retrieval.training.datasets import open_eval_data
from retrieval.training.imagesets import decode_square
from retrieval.training.validation import classify
from tests.corpus import make_labelled_folder

CLASSES = ["circles", "squares", "stripes"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random 3-class model with 73 -> 64 px preprocessing."""
    path = tmp_path_factory.mktemp("eval") / "model.pt"
    model = build_alexnet(ModelArgs(num_classes=3), seed=3)
    prep = Preprocessing(resize=73, crop=64, mean=(0.6, 0.6, 0.6), std=(0.3, 0.3, 0.3))
    save_checkpoint(path, model, prep, classes=CLASSES)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_labelled_folder(tmp_path / "data" / "val", classes=3, per_class=3, size=40)
    return tmp_path / "data"


def test_centre_crop_logits_equal_the_index_preprocessing(checkpoint: Path, folder: Path) -> None:
    loaded = load_model(checkpoint)
    prep = loaded.preprocessing
    images = open_eval_data(folder, CLASSES, 3)
    transform = BatchTransform(prep.crop, prep.mean, prep.std)
    logits, labels = classify(loaded.model, images, transform, prep.resize, 4, torch.device("cpu"))
    one_by_one = torch.stack([prep(load_image(Path(p))) for p in images.paths])
    with torch.no_grad():
        expected = loaded.model(one_by_one)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_ten_crops_average_torchvisions_tencrop_softmax(checkpoint: Path, folder: Path) -> None:
    loaded = load_model(checkpoint)
    prep = loaded.preprocessing
    images = open_eval_data(folder, CLASSES, 3)
    transform = BatchTransform(prep.crop, prep.mean, prep.std)
    probs, _ = classify(
        loaded.model, images, transform, prep.resize, 4, torch.device("cpu"), ten_crop=True
    )
    path = images.paths[4]
    square = transforms.functional.to_pil_image(decode_square(path, "RGB", prep.resize))
    crops = transforms.TenCrop(prep.crop)(square)
    batch = torch.stack(
        [prep.normalize(transforms.functional.pil_to_tensor(c)[None])[0] for c in crops]
    )
    with torch.no_grad():
        expected = loaded.model(batch).softmax(dim=1).mean(dim=0)
    assert torch.allclose(probs[4], expected, atol=1e-5)
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(probs)), atol=1e-5)


def test_report_has_top_k_and_every_class(checkpoint: Path, folder: Path) -> None:
    report = evaluate_classifier(checkpoint, folder, device="cpu", workers=0)
    assert report.images == 9
    assert set(report.per_class) == set(CLASSES)
    assert 0 <= report.top1 <= report.top5 == 1.0  # 3 classes: top-5 always right
    assert report.top1_ten_crop is not None
    by_class = sum(report.per_class.values()) / 3
    assert report.top1 == pytest.approx(by_class)  # 3 images in every class


def test_evaluate_command_prints_json(checkpoint: Path, folder: Path) -> None:
    from retrieval.cli.main import cli

    args = ["evaluate", str(folder), "--weights", str(checkpoint), "--no-ten-crop", "--json"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 9 and data["top1_ten_crop"] is None


def test_evaluate_without_weights_is_a_usage_error(folder: Path) -> None:
    from retrieval.cli.main import cli

    result = CliRunner().invoke(cli, ["evaluate", str(folder)])
    assert result.exit_code == 2


def test_class_folders_unknown_to_the_model_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    from retrieval.errors import DataError

    make_labelled_folder(tmp_path / "other", classes=5, per_class=1, size=32)
    with pytest.raises(DataError, match="not in the model's classes"):
        evaluate_classifier(checkpoint, tmp_path / "other", device="cpu", workers=0)
