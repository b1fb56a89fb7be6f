"""--finetune PATH: start from any checkpoint (other classes, any arch the project trains),
record the start, refuse another architecture with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from retrieval.errors import WeightsError
from retrieval.model.alexnet import ModelArgs, build_alexnet
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import load_model, read_checkpoint, save_checkpoint
from retrieval.training.recipes import build_model, make_recipe
from tests.corpus import make_labelled_folder

SIZE = 64
PREP = Preprocessing(resize=73, crop=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    make_labelled_folder(tmp_path / "shapes" / "train", classes=3, per_class=6, size=48)
    make_labelled_folder(tmp_path / "shapes" / "val", classes=3, per_class=2, size=48)
    return tmp_path / "shapes"


def _checkpoint(path: Path, args: ModelArgs, classes: int = 5, seed: int = 7) -> Path:
    """A project checkpoint of ``classes`` other classes (seeded weights stand in for training)."""
    model = build_alexnet(ModelArgs(**{**args.to_dict(), "num_classes": classes}), seed=seed)
    prep = PREP if args.arch != "cifar" else Preprocessing(37, 32, PREP.mean, PREP.std)
    save_checkpoint(path, model, prep, classes=[f"other{i}" for i in range(classes)])
    return path


VARIANTS = [
    ModelArgs(),
    ModelArgs(arch="paper"),
    ModelArgs(arch="cifar"),
    ModelArgs(batch_norm=True),
    ModelArgs(arch="paper", groups=2),
]


@pytest.mark.parametrize("args", VARIANTS, ids=lambda a: f"{a.arch}-bn{a.batch_norm}-g{a.groups}")
def test_every_arch_starts_from_a_checkpoint_of_other_classes(
    tmp_path: Path, args: ModelArgs
) -> None:
    start = _checkpoint(tmp_path / "start.pt", args)
    before = read_checkpoint(start)["model"]
    recipe = make_recipe(
        finetune=str(start),
        arch=args.arch,
        batch_norm=args.batch_norm,
        groups=args.groups,
        image_size=32 if args.arch == "cifar" else SIZE,
    )
    assert recipe.lr == pytest.approx(0.001)  # lowered, as for imagenet
    model = build_model(recipe, 3, 3)
    state = model.state_dict()
    head = f"classifier.{len(model.classifier) - 1}."
    kept = [k for k in before if not k.startswith(head)]
    assert kept and all(torch.equal(state[k], before[k]) for k in kept)
    assert model.classifier[-1].out_features == 3  # a new head for this folder's classes


def test_a_plain_torchvision_state_dict_is_a_starting_point(tmp_path: Path) -> None:
    import torchvision

    state = torchvision.models.alexnet(num_classes=7).state_dict()
    torch.save(state, tmp_path / "plain.pth")
    model = build_model(make_recipe(finetune=str(tmp_path / "plain.pth")), 3, 1)
    assert torch.equal(model.classifier[4].weight, state["classifier.4.weight"])
    assert torch.allclose(model.features[0].weight, state["features.0.weight"].sum(1, True))


def test_finetune_from_a_checkpoint_trains_indexes_queries_and_info_names_it(
    shapes: Path, tmp_path: Path
) -> None:
    from retrieval.cli.main import cli

    start = _checkpoint(tmp_path / "start.pt", ModelArgs())
    out = tmp_path / "tuned.pt"
    args = ["train", str(shapes), "-o", str(out), "--finetune", str(start), "--epochs", "1"]
    more = ["--image-size", str(SIZE), "--batch-size", "6", "--workers", "0", "--json"]
    result = CliRunner().invoke(cli, [*args, "--freeze", "features", *more])
    assert result.exit_code == 0, result.output

    tuned, original = load_model(out), load_model(start)
    assert tuned.classes == ["circles", "squares", "stripes"]
    assert tuned.preprocessing.mean == PREP.mean  # the start's statistics, not re-measured
    assert torch.equal(tuned.model.features[0].weight, original.model.features[0].weight)
    assert not torch.equal(tuned.model.classifier[4].weight, original.model.classifier[4].weight)
    recorded = tuned.started_from
    assert recorded["source"] == str(start.resolve()) and recorded["sha256"] == original.sha256
    assert recorded["classes"] == [f"other{i}" for i in range(5)] and recorded["num_classes"] == 5

    index = tmp_path / "index"
    result = CliRunner().invoke(
        cli, ["index", str(shapes / "train"), "--index", str(index), "--weights", str(out)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["info", "--index", str(index)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("fine-tuned"))
    assert str(start.resolve()) in line and original.sha256[:12] in line and "5 classes" in line
    info = json.loads(CliRunner().invoke(cli, ["info", "--index", str(index), "--json"]).stdout)
    assert info["started_from"]["sha256"] == original.sha256
    query = next((shapes / "val").rglob("*.png"))
    result = CliRunner().invoke(cli, ["query", str(query), "--index", str(index), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert len([x for x in result.stdout.splitlines() if ".png" in x]) >= 3


def test_a_start_of_another_arch_is_refused_with_one_line(shapes: Path, tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    start = _checkpoint(tmp_path / "start.pt", ModelArgs(arch="paper", batch_norm=True))
    args = ["train", str(shapes), "-o", str(tmp_path / "m.pt"), "--finetune", str(start)]
    result = CliRunner().invoke(cli, [*args, "--epochs", "1", "--workers", "0"])
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "--arch paper --batch-norm" in message and "--arch torchvision" in message
    assert not (tmp_path / "m.pt").exists()


def test_finetune_of_a_missing_file_or_random_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="expected imagenet or a weights file"):
        make_recipe(finetune=str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="imagenet or a weights file"):
        make_recipe(finetune="random")
