"""Training curves: OUTPUT.curves.png after every epoch, and --plot from a metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval.figures import curves
from tests.corpus import make_labelled_folder

ROWS = [
    {"epoch": 1, "epochs": 3, "train_loss": 1.1, "top1_error": 0.6, "top5_error": 0.1,
     "precision@6": 0.4, "map": 0.35, "lr": 0.004, "kept_epoch": 1},
    {"epoch": 2, "epochs": 3, "train_loss": 0.9, "top1_error": 0.4, "top5_error": 0.05,
     "precision@6": 0.5, "map": 0.45, "lr": 0.01, "kept_epoch": 2},
    {"epoch": 3, "epochs": 3, "train_loss": 0.7, "top1_error": 0.45, "top5_error": 0.0,
     "precision@6": 0.48, "map": 0.41, "lr": 0.0001, "kept_epoch": 2},
]  # fmt: skip


def _lines(axes) -> dict[str, list]:
    return {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}


def test_the_figure_plots_every_metric_of_the_log_and_marks_the_kept_epoch() -> None:
    figure = curves.curves_figure(ROWS, title="m.pt")
    loss, acc, fc7, lr = figure.axes
    assert _lines(loss)["train loss"] == [1.1, 0.9, 0.7]
    assert _lines(acc)["top-1"] == pytest.approx([40.0, 60.0, 55.0])
    assert _lines(acc)["top-5"] == pytest.approx([90.0, 95.0, 100.0])
    assert _lines(fc7)["precision@6"] == [0.4, 0.5, 0.48] and _lines(fc7)["mAP"][1] == 0.45
    assert _lines(lr)["lr"] == [0.004, 0.01, 0.0001]  # the schedule on its own axis
    for axes in figure.axes:
        kept = [x for x in axes.get_lines() if x.get_label() == "kept: epoch 2"]
        assert len(kept) == 1 and list(kept[0].get_xdata()) == [2, 2]
    assert [a.get_ylabel() for a in figure.axes] == [
        "cross-entropy", "accuracy (%)", "score", "learning rate"
    ]  # fmt: skip
    assert fc7.get_xlabel() == "epoch" and "epoch 3 of 3" in figure.get_suptitle()


def test_a_log_without_top_5_draws_no_top_5_line() -> None:
    rows = [{k: v for k, v in row.items() if k != "top5_error"} for row in ROWS]
    _, acc, _, _ = curves.curves_figure(rows, title="three classes").axes
    assert set(_lines(acc)) == {"top-1", "kept: epoch 2"}


def test_plot_redraws_the_curves_from_a_metrics_log(tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    log = tmp_path / "m.metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["train", "--plot", str(log), "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1000, 700)
    log.write_text("not json\n")
    result = CliRunner().invoke(cli, ["train", "--plot", str(log), "-o", str(out)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "not a metrics log" in result.output


def test_training_draws_the_curves_after_every_epoch(tmp_path: Path, monkeypatch) -> None:
    from retrieval.cli.main import cli

    data = tmp_path / "shapes"
    make_labelled_folder(data / "train", classes=3, per_class=6, size=48)
    make_labelled_folder(data / "val", classes=3, per_class=2, size=48)
    out = tmp_path / "m.pt"
    drawn: list[list[int]] = []
    real = curves.save_curves

    def spy(rows, output, title=""):
        drawn.append([r["epoch"] for r in rows])
        path = real(rows, output, title)
        assert Path(output).exists()
        return path

    monkeypatch.setattr(curves, "save_curves", spy)
    args = ["train", str(data), "-o", str(out), "--image-size", "64", "--epochs", "2"]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "6", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert drawn == [[1], [1, 2]]  # after the first epoch, then redrawn with the second
    summary = json.loads(result.stdout)
    assert summary["curves"] == str(tmp_path / "m.curves.png")
    rows = curves.read_metrics(tmp_path / "m.metrics.jsonl")
    assert rows[-1]["kept_epoch"] == summary["best"]["epoch"]
    with Image.open(tmp_path / "m.curves.png") as image:
        assert image.size == (1000, 700)
