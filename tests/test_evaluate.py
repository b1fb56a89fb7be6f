"""Classifier evaluation: centre crop as the index sees it, the paper's ten crops, per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def test_report_has_top_1_and_every_class_and_no_top_5_of_three_classes(
    checkpoint: Path, folder: Path
) -> None:
    report = evaluate_classifier(checkpoint, folder, device="cpu", workers=0)
    assert report.images == 9
    assert set(report.per_class) == set(CLASSES)
    assert 0 <= report.top1 <= 1
    assert report.top5 is None and report.top5_ten_crop is None  # 3 classes: always right
    assert report.top1_ten_crop is not None
    by_class = sum(report.per_class.values()) / 3
    assert report.top1 == pytest.approx(by_class)  # 3 images in every class


def test_evaluate_command_prints_json(checkpoint: Path, folder: Path) -> None:
    from retrieval.cli.main import cli

    args = ["evaluate", str(folder), "--weights", str(checkpoint), "--no-ten-crop", "--json"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 9 and data["top1_ten_crop"] is None and data["top5"] is None
    text = CliRunner().invoke(cli, [*args[:-1], "--workers", "0"])
    assert text.exit_code == 0, text.output
    assert "9 images: top-1 " in text.stdout and "top-5" not in text.stdout


def test_evaluate_without_weights_is_a_usage_error(folder: Path) -> None:
    from retrieval.cli.main import cli

    result = CliRunner().invoke(cli, ["evaluate", str(folder)])
    assert result.exit_code == 2


def test_class_folders_unknown_to_the_model_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    from retrieval.errors import DataError

    make_labelled_folder(tmp_path / "other", classes=5, per_class=1, size=32)
    with pytest.raises(DataError, match="not in the model's classes"):
        evaluate_classifier(checkpoint, tmp_path / "other", device="cpu", workers=0)


def test_the_confusion_matrix_counts_every_image_once(checkpoint: Path, folder: Path) -> None:
    report = evaluate_classifier(checkpoint, folder, device="cpu", workers=0, ten_crop=False)
    matrix = np.array(report.confusion)
    assert report.classes == CLASSES and matrix.shape == (3, 3)
    assert matrix.sum() == report.images == 9
    assert matrix.sum(axis=1).tolist() == [3, 3, 3]  # rows: the true classes
    assert np.trace(matrix) / 9 == pytest.approx(report.top1)
    for i, name in enumerate(CLASSES):
        assert matrix[i, i] / 3 == pytest.approx(report.per_class[name])
    # The columns are the classifier's own predictions, counted independently here.
    loaded = load_model(checkpoint)
    prep = loaded.preprocessing
    images = open_eval_data(folder, CLASSES, 3)
    transform = BatchTransform(prep.crop, prep.mean, prep.std)
    logits, _ = classify(loaded.model, images, transform, prep.resize, 4, torch.device("cpu"))
    assert matrix.sum(axis=0).tolist() == np.bincount(logits.argmax(1), minlength=3).tolist()


def test_evaluate_draws_the_confusion_matrix_with_the_classes_on_its_axes(
    checkpoint: Path, folder: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from retrieval.cli.main import cli
    from retrieval.figures.confusion import confusion_figure

    out = tmp_path / "confusion.png"
    args = ["evaluate", str(folder), "--weights", str(checkpoint), "--no-ten-crop", "--json"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sum(map(sum, data["confusion"])) == data["images"] == 9
    assert data["classes"] == CLASSES
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) >= 500

    figure = confusion_figure(np.array(data["confusion"]), CLASSES)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in axes.get_yticklabels()] == CLASSES
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted class", "true class")
    shares = axes.get_images()[0].get_array()
    assert np.allclose(shares.sum(axis=1), 1.0)  # colours: each row's shares
    assert sum(int(t.get_text()) for t in axes.texts) == 9  # the counts in the cells


def test_many_classes_are_drawn_unnamed_and_their_largest_confusions_listed() -> None:
    from retrieval.figures.confusion import LABELLED, confusion_figure, largest_confusions

    n = LABELLED + 20
    matrix = np.eye(n, dtype=int) * 5
    matrix[3, 7], matrix[10, 2], matrix[50, 51] = 4, 2, 3
    labels = [f"class{i}" for i in range(n)]
    cells = largest_confusions(matrix, labels, n=10)
    assert [(c["true"], c["predicted"], c["count"]) for c in cells] == [
        ("class3", "class7", 4),
        ("class50", "class51", 3),
        ("class10", "class2", 2),
    ]
    assert cells[0]["share_of_true"] == pytest.approx(4 / 9)
    axes = confusion_figure(matrix, labels).axes[0]
    assert not axes.get_xticklabels() and not axes.texts
    assert "largest confusions" in axes.get_title()


def test_wordnet_id_classes_are_named_from_words_txt_beside_the_data(tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    wnids = ["n01440764", "n02102040", "n02979186"]
    path = tmp_path / "wnid.pt"
    model = build_alexnet(ModelArgs(num_classes=3), seed=3)
    prep = Preprocessing(resize=73, crop=64, mean=(0.6, 0.6, 0.6), std=(0.3, 0.3, 0.3))
    save_checkpoint(path, model, prep, classes=wnids)
    made = make_labelled_folder(tmp_path / "data" / "val", classes=3, per_class=2, size=40)
    for wnid, shape in zip(wnids, made, strict=True):
        (tmp_path / "data" / "val" / shape).rename(tmp_path / "data" / "val" / wnid)
    (tmp_path / "data" / "words.txt").write_text(
        "n01440764\ttench, Tinca tinca\nn02102040\tEnglish springer\nn02979186\tcassette player\n"
    )
    args = ["evaluate", str(tmp_path / "data"), "--weights", str(path), "--no-ten-crop"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "  tench (n01440764): " in result.stdout
    assert "  cassette player (n02979186): " in result.stdout
    report = evaluate_classifier(path, tmp_path / "data", device="cpu", workers=0, ten_crop=False)
    assert report.names == dict(zip(wnids, ["tench", "English springer", "cassette player"]))
    assert report.labels() == ["tench", "English springer", "cassette player"]  # the axes
    assert report.draw_confusion(tmp_path / "c.png").exists()
