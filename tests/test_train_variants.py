"""Issue 14: budgets that fit the data, runs that cannot blow up, checkpoints kept for retrieval,
and the seeds' AlexNet variants from training to a query."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from retrieval.model.weights import load_model, read_checkpoint
from retrieval.training import budget
from retrieval.training.loop import TrainingDiverged, train
from retrieval.training.prepare import RunOptions
from retrieval.training.recipes import make_recipe, warmup_factor
from tests.corpus import make_labelled_folder


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    make_labelled_folder(tmp_path / "shapes" / "train", classes=3, per_class=6, size=48)
    make_labelled_folder(tmp_path / "shapes" / "val", classes=3, per_class=2, size=48)
    return tmp_path / "shapes"


def test_small_folders_get_small_batches_and_enough_steps_large_ones_not_too_many() -> None:
    assert budget.default_batch_size(550) == 32
    assert budget.default_batch_size(60_000) == 128
    assert budget.default_batch_size(40) == 16
    small = budget.resolve_budget(make_recipe(), 490)  # 10% of a 550-image folder held out
    assert small.batch_size == 32 and small.steps >= budget.MIN_STEPS * 0.97
    assert small.epochs <= budget.MAX_EPOCHS
    large = budget.resolve_budget(make_recipe(), 60_000)
    assert large.batch_size == 128 and large.epochs == budget.BASE_EPOCHS
    tiny = budget.resolve_budget(make_recipe(), 18)
    assert tiny.epochs == budget.MAX_EPOCHS  # a tiny set is not passed over 1,000 times
    given = budget.resolve_budget(make_recipe(epochs=3, batch_size=5), 18)
    assert (given.epochs, given.steps, given.batch_size) == (3, 12, 5)
    steps = budget.resolve_budget(make_recipe(steps=40, batch_size=6), 18)
    assert (steps.epochs, steps.steps) == (13, 39)  # rounded to whole epochs


def test_paper_recipe_warms_up_linearly_and_onecycle_needs_no_extra_warm_up() -> None:
    paper = budget.resolve_budget(make_recipe("paper"), 10_000)
    assert paper.warmup_steps == round(budget.WARMUP_SHARE * paper.steps)
    assert warmup_factor(paper, 0) == pytest.approx(1 / paper.warmup_steps)
    assert warmup_factor(paper, paper.warmup_steps) == 1.0
    assert budget.resolve_budget(make_recipe("onecycle"), 10_000).warmup_steps == 0


def test_time_budget_picks_the_largest_size_that_fits_and_says_so(monkeypatch) -> None:
    # A slow CPU's seconds per step at 64 px (no clock in the test); larger sizes scale by area.
    monkeypatch.setattr(budget, "time_steps", lambda r, size, *a, **k: {64: 0.25}[size])
    cpu = torch.device("cpu")
    plan = budget.plan_for_time(make_recipe("paper"), 600, 490, 10, 3, cpu)
    # 450 s of training: 128 px fits 450 steps, 96 px 800, 64 px 1,800 (the rule wants ~1,000).
    assert plan.recipe.image_size == 64 and plan.recipe.name == "onecycle"
    assert plan.recipe.steps == budget.resolve_budget(plan.recipe, 490).steps
    assert 0.9 * 1000 <= plan.recipe.steps <= 1800
    assert "64-px input" in plan.describe(cpu) and "steps" in plan.describe(cpu)
    roomy = budget.plan_for_time(make_recipe(), 3600, 490, 10, 3, cpu)
    assert roomy.recipe.image_size == 128  # 2,700 s fit the ~1,000 steps at 128 px
    short = budget.plan_for_time(make_recipe(), 60, 490, 10, 3, cpu)
    assert short.recipe.image_size == 64 and short.recipe.steps <= 1.1 * 180
    assert budget.parse_duration("10m") == 600 and budget.parse_duration("1.5h") == 5400


def test_time_budget_never_plans_more_than_fits(monkeypatch) -> None:
    monkeypatch.setattr(budget, "time_steps", lambda r, size, *a, **k: {64: 0.25}[size])
    cpu = torch.device("cpu")
    # 60,000 images in batches of 128 are 469 steps a pass; 30.1 s leave 22.6 s: 90 steps.
    short = budget.plan_for_time(make_recipe(), 30.1, 60_000, 10, 1, cpu)
    assert (short.recipe.subset, short.recipe.steps, short.recipe.epochs) == (90 * 128, 90, 1)
    assert "stratified 11520-image subset" in short.describe(cpu)
    # 1.95 passes fit: two whole passes (within 10%); 1.6 fit: neither one nor two passes over
    # all the data is within 10%, so two passes over a subset of 375 batches (750 steps).
    near = budget.plan_for_time(make_recipe(), 1.95 * 469 * 0.25 / 0.75 + 0.1, 60_000, 10, 1, cpu)
    assert (near.recipe.subset, near.recipe.epochs, near.recipe.steps) == (None, 2, 938)
    fit = budget.plan_for_time(make_recipe(), 1.6 * 469 * 0.25 / 0.75 + 0.1, 60_000, 10, 1, cpu)
    assert (fit.recipe.subset, fit.recipe.epochs, fit.recipe.steps) == (375 * 128, 2, 750)


def test_a_sub_epoch_time_budget_trains_one_pass_of_a_stratified_subset(
    shapes: Path, tmp_path: Path, monkeypatch
) -> None:
    # 18 training images in batches of 16 are 2 steps a pass; the clock allows 1.
    monkeypatch.setattr(budget, "time_steps", lambda *a, **k: 0.5)
    options = RunOptions(workers=0, time_budget=1.0)
    result = train(shapes, tmp_path / "s.pt", make_recipe(image_size=64), options)
    assert (result.recipe.subset, result.recipe.epochs, result.recipe.steps) == (16, 1, 1)
    assert "16-image subset" in result.plan and len(result.history) == 1


def test_a_run_keeps_its_planned_end_within_the_tolerance_and_else_ends_where_it_fits() -> None:
    # 10 of 100 epochs done in 20 s of a 60 s budget: 2 s each, 40 s left.
    assert budget.epochs_that_fit(10, 100, 2.0, 40.0, 60.0) == 30
    assert budget.epochs_that_fit(10, 32, 2.0, 40.0, 60.0) == 32  # 44 s: within 10% of 60
    assert budget.epochs_that_fit(10, 34, 2.0, 40.0, 60.0) == 30  # 48 s: past it
    assert budget.epochs_that_fit(10, 100, 2.0, -5.0, 60.0) == 10  # already late: end now


def test_a_time_budget_the_plan_misjudged_ends_at_the_last_epoch_that_fits(
    shapes: Path, tmp_path: Path, monkeypatch
) -> None:
    # The probe says a step is free, so the plan is the tiny set's default, 100 epochs; the
    # epochs measured as they run (each well over 0.1 s) say how many of them really fit.
    monkeypatch.setattr(budget, "time_steps", lambda *a, **k: 1e-6)
    seconds = 6.0
    options = RunOptions(workers=0, time_budget=seconds)
    recipe = make_recipe(image_size=64)
    result = train(shapes, tmp_path / "b.pt", recipe, options)
    assert "100 epochs" in result.plan and "fit, not 100" in result.plan
    assert result.history[-1]["epochs"] == result.epochs
    assert result.finished and 1 <= result.epochs < 100 and len(result.history) == result.epochs
    assert result.recipe.epochs == result.epochs and result.seconds < 2 * seconds
    saved = read_checkpoint(tmp_path / "b.pt")
    assert saved["finished"] and saved["recipe"]["epochs"] == result.epochs


def test_a_one_cycle_schedule_redrawn_mid_run_anneals_by_the_new_end() -> None:
    from retrieval.training.recipes import make_scheduler

    def optimizer() -> torch.optim.SGD:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)

    recipe = make_recipe(lr=0.01)
    long = optimizer()
    scheduler = make_scheduler(replace(recipe, epochs=100), long, 2)
    for _ in range(4):  # 2 epochs of 2 steps, still warming up to 100 epochs' peak
        long.step()
        scheduler.step()
    short = replace(recipe, epochs=6)
    redrawn = make_scheduler(short, long, 2, start_step=4)
    fresh = optimizer()
    reference = make_scheduler(short, fresh, 2)
    for _ in range(4):
        fresh.step()
        reference.step()
    used = []
    for _ in range(4, 12):  # the rest of the 6 epochs: the rates the steps train with
        assert long.param_groups[0]["lr"] == pytest.approx(fresh.param_groups[0]["lr"])
        used.append(long.param_groups[0]["lr"])
        long.step()
        redrawn.step()
        fresh.step()
        reference.step()
    assert max(used) > 0.005 and used[-1] < 1e-6  # past its peak and annealed at the last step


def test_the_resume_checkpoint_is_written_once_a_minute_not_every_short_epoch(
    shapes: Path, tmp_path: Path, monkeypatch
) -> None:
    from retrieval.training import loop

    saves: list[bool] = []
    real = loop.save_checkpoint
    monkeypatch.setattr(
        loop, "save_checkpoint", lambda *a, **k: saves.append(k["finished"]) or real(*a, **k)
    )
    recipe = make_recipe(image_size=64, epochs=3, batch_size=9)
    train(shapes, tmp_path / "a.pt", recipe, RunOptions(workers=0))
    assert saves == [True]  # three epochs of a second each: only the finished run is written
    saves.clear()
    monkeypatch.setattr(loop, "SAVE_SECONDS", 0.0)
    train(shapes, tmp_path / "b.pt", recipe, RunOptions(workers=0))
    assert saves == [False, False, True]


def test_one_class_folder_is_refused_before_training(tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    make_labelled_folder(tmp_path / "one", classes=1, per_class=6, size=48)
    out = tmp_path / "one.pt"
    args = ["train", str(tmp_path / "one"), "-o", str(out), "--image-size", "64", "--epochs", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "needs at least 2" in result.output.strip().splitlines()[-1]
    assert not out.exists()


def test_a_diverging_run_stops_with_one_line_and_writes_no_checkpoint(
    shapes: Path, tmp_path: Path
) -> None:
    from retrieval.cli.main import cli

    out = tmp_path / "blown.pt"
    args = ["train", str(shapes), "-o", str(out), "--image-size", "64", "--epochs", "3"]
    args += ["--batch-size", "6", "--lr", "50", "--clip-norm", "0", "--workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: training diverged at epoch 1") and "no checkpoint" in error
    assert not out.exists()
    with pytest.raises(TrainingDiverged):
        recipe = make_recipe(image_size=64, epochs=3, batch_size=6, lr=50.0, clip_norm=0)
        train(shapes, out, recipe, RunOptions(workers=0))


def test_default_recipe_does_not_diverge_on_a_tiny_set(shapes: Path, tmp_path: Path) -> None:
    recipe = make_recipe("paper", image_size=64, epochs=4, batch_size=6)
    result = train(shapes, tmp_path / "p.pt", recipe, RunOptions(workers=0))
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] < 3 for r in result.history)


def test_select_keeps_the_best_epoch_by_map_or_top1(shapes: Path, tmp_path: Path) -> None:
    recipe = make_recipe(image_size=64, epochs=3, batch_size=6, select="top1")
    result = train(shapes, tmp_path / "t.pt", recipe, RunOptions(workers=0))
    accuracies = [1 - r["top1_error"] for r in result.history]
    best = accuracies.index(max(accuracies)) + 1
    checkpoint = read_checkpoint(tmp_path / "t.pt")
    assert checkpoint["best"]["epoch"] == best and checkpoint["best"]["select"] == "top1"
    assert all("map" in r and "precision@6" in r for r in result.history)


def test_training_leaves_the_global_rng_and_thread_count_as_found(
    shapes: Path, tmp_path: Path
) -> None:
    torch.manual_seed(123)
    before, threads = torch.random.get_rng_state(), torch.get_num_threads()
    train(shapes, tmp_path / "r.pt", make_recipe(image_size=64, epochs=1, batch_size=9))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.get_num_threads() == threads


VARIANTS = [
    pytest.param(["--arch", "cifar"], {"arch": "cifar"}, 32, 4608, id="cifar"),
    pytest.param(
        ["--batch-norm", "--image-size", "64"], {"batch_norm": True}, 64, 4096, id="batch-norm"
    ),
    pytest.param(
        ["--arch", "paper", "--groups", "2", "--image-size", "64"],
        {"arch": "paper", "groups": 2},
        64,
        4096,
        id="paper-groups-2",
    ),
]


@pytest.mark.parametrize(("options", "recorded", "size", "width"), VARIANTS)
def test_each_variant_trains_evaluates_indexes_and_queries_with_no_other_option(
    shapes: Path, tmp_path: Path, options: list[str], recorded: dict, size: int, width: int
) -> None:
    from retrieval.cli.main import cli
    from retrieval.evaluation.classifier import evaluate_classifier

    out = tmp_path / "m.pt"
    args = ["train", str(shapes), "-o", str(out), "--epochs", "1", "--batch-size", "9"]
    result = CliRunner().invoke(cli, [*args, *options, "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    loaded = load_model(out)
    assert all(getattr(loaded.args, k) == v for k, v in recorded.items())
    assert loaded.preprocessing.crop == size and loaded.fc7_dim == width

    report = evaluate_classifier(out, shapes, device="cpu", ten_crop=False, workers=0)
    assert report.images == 6 and 0 <= report.top1 <= 1

    index = tmp_path / "index"
    result = CliRunner().invoke(
        cli, ["index", str(shapes / "train"), "--index", str(index), "--weights", str(out)]
    )
    assert result.exit_code == 0, result.output
    query = next((shapes / "val").rglob("*.png"))
    result = CliRunner().invoke(cli, ["query", str(query), "--index", str(index), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert len([line for line in result.stdout.splitlines() if ".png" in line]) >= 3


def test_visualize_draws_a_two_group_networks_kernels_as_two_blocks(tmp_path: Path) -> None:
    from retrieval.figures.kernels import GROUP_GAP, draw_kernels
    from retrieval.model.alexnet import ModelArgs, build_alexnet
    from retrieval.model.preprocess import Preprocessing
    from retrieval.model.weights import save_checkpoint

    path = tmp_path / "two.pt"
    model = build_alexnet(ModelArgs(arch="paper", groups=2, num_classes=3), seed=0)
    with torch.no_grad():  # group 2 (kernels 48-95) grey, group 1 coloured, as in Figure 3
        model.features[0].weight[48:] = model.features[0].weight[48:].mean(1, keepdim=True)
    save_checkpoint(path, model, Preprocessing())
    pixels = np.asarray(Image.open(draw_kernels(path, tmp_path / "k.png", scale=1)), np.int16)
    # Each group: 48 kernels of 11x11 in 3 rows of 16 with 1-px gaps; a white band between.
    block = 3 * 12 + 1
    assert pixels.shape == (2 * block + GROUP_GAP, 16 * 12 + 1, 3)
    top, gap, bottom = pixels[:block], pixels[block : block + GROUP_GAP], pixels[-block:]
    assert (gap == 255).all()
    assert top.std() > 10 and bottom.std() > 10  # both groups drawn
    colour = lambda a: np.abs(a[..., 0] - a[..., 1]).mean()  # noqa: E731
    assert colour(top) > 5 and colour(bottom) == 0  # the grey group came out grey


def test_cifar_rejects_an_image_size_below_its_smallest() -> None:
    from retrieval.errors import RetrieveError

    with pytest.raises(RetrieveError, match="below the cifar"):
        make_recipe(arch="cifar", image_size=8)
    with pytest.raises(RetrieveError, match="below the torchvision"):
        make_recipe(image_size=32)


def test_train_json_says_what_the_budget_chose(shapes: Path, tmp_path: Path) -> None:
    from retrieval.cli.main import cli

    out = tmp_path / "b.pt"
    args = ["train", str(shapes), "-o", str(out), "--image-size", "64", "--steps", "4"]
    result = CliRunner().invoke(cli, [*args, "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recipe"]["batch_size"] == 16 and summary["recipe"]["steps"] == 4
    assert "batches of 16" in result.stderr


def test_a_recipe_stored_before_these_options_resumes_as_it_was_trained() -> None:
    from retrieval.training.recipes import Recipe

    old = {"name": "paper", "epochs": 90, "batch_size": 128, "lr": 0.01, "augmentation": {}}
    recipe = Recipe.from_dict(old)
    assert (recipe.clip_norm, recipe.warmup_steps, recipe.init) == (0.0, 0, "kaiming")
    assert recipe.select == "top1" and recipe.epochs == 90
    assert Recipe.from_dict(make_recipe().to_dict()) == make_recipe()
