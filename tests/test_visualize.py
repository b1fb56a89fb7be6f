"""Figure 3 (conv1 kernels) and feature maps as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.figures.kernels import draw_feature_maps, draw_kernels, kernel_grid
from retrieval.model.alexnet import ModelArgs, build_alexnet
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import save_checkpoint
from tests.corpus import make_labelled_folder


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vis") / "grey.pt"
    prep = Preprocessing(resize=64, crop=64, mean=(0.5,), std=(0.25,), channels=1)
    save_checkpoint(path, build_alexnet(ModelArgs(in_channels=1, num_classes=2), seed=0), prep)
    return path


def test_kernels_become_a_grid_of_coloured_patches(tmp_path: Path) -> None:
    out = draw_kernels("random:1", tmp_path / "k.png", scale=2)
    image = Image.open(out)
    # 64 kernels of 11x11, 16 per row, 1 px gaps: 16 * 12 + 1 wide, 4 * 12 + 1 high.
    assert image.mode == "RGB" and image.size == ((16 * 12 + 1) * 2, (4 * 12 + 1) * 2)
    assert np.asarray(image).std() > 10  # not blank


def test_each_kernel_is_stretched_to_its_own_range() -> None:
    weight = torch.zeros(2, 3, 11, 11)
    weight[0, 0, 0, 0], weight[1, 1, 5, 5] = 0.01, 5.0
    grid = kernel_grid(weight, per_row=2)
    first, second = grid[:, 1:12, 1:12], grid[:, 1:12, 13:24]
    assert first.max() == pytest.approx(1.0) and second.max() == pytest.approx(1.0)


def test_one_channel_models_give_grey_kernels(grey_model: Path, tmp_path: Path) -> None:
    image = Image.open(draw_kernels(grey_model, tmp_path / "g.png", scale=1))
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_feature_maps_show_one_tile_per_channel(tmp_path: Path) -> None:
    make_labelled_folder(tmp_path / "imgs", classes=1, per_class=1, size=48)
    photo = next((tmp_path / "imgs").rglob("*.png"))
    out = draw_feature_maps("random", photo, tmp_path / "maps.png", layer="conv2", scale=1)
    # conv2 of a 224-px input: 192 maps of 27x27, 14 per row (ceil(sqrt(192))), 1 px gaps.
    assert Image.open(out).size == (14 * 28 + 1, 14 * 28 + 1)
    with pytest.raises(RetrieveError, match="unknown layer"):
        draw_feature_maps("random", photo, tmp_path / "x.png", layer="conv9")


def test_visualize_command_writes_the_png(grey_model: Path, tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    out = tmp_path / "fig3.png"
    result = CliRunner().invoke(cli, ["visualize", "--weights", str(grey_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and result.stdout.strip() == str(out)


def test_visualize_without_weights_draws_the_index_model(
    small_model: Path, photos: Path, in_tmp: Path
) -> None:
    from retrieval import Index, IndexOptions
    from retrieval.cli.main import cli

    Index.create("idx", photos, IndexOptions(weights=str(small_model))).close()
    result = CliRunner().invoke(cli, ["visualize", "--index", "idx"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "kernels.png"  # the default name, in the current folder
    expected = draw_kernels(small_model, in_tmp / "expected.png")
    assert np.array_equal(np.asarray(Image.open("kernels.png")), np.asarray(Image.open(expected)))
    other = draw_kernels("random:5", in_tmp / "other.png")
    assert not np.array_equal(np.asarray(Image.open("kernels.png")), np.asarray(Image.open(other)))

    missing = CliRunner().invoke(cli, ["visualize", "--index", "nowhere"])
    assert missing.exit_code == 2 and "--weights" in missing.output


def test_figure_labels_draw_letters_beyond_ascii() -> None:
    """Folder names like ``Müller`` or ``Smørrebrød`` must not come out as rows of empty boxes:
    Pillow's default font draws one box for every letter it lacks, so two such letters would
    render alike."""
    from retrieval.figures.fonts import label_font

    font = label_font(20)
    marks = {letter: bytes(font.getmask(letter)) for letter in "üøéñЖλ"}
    assert len(set(marks.values())) == len(marks)
