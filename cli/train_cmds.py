"""``train``: parse the recipe options, call ``retrieval.train``, print the last epoch."""

from __future__ import annotations

from pathlib import Path

import click

from retrieval.units import counted

from .options import device_option, emit_json, json_option, precision_option, workers_option
from .progress import stage_bars


@click.command("train")
@click.argument(
    "data_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint to write (a .metrics.jsonl log and .curves.png go next to it); with "
    "--plot, the picture.",
)
@click.option(
    "--plot",
    "plot_log",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    metavar="METRICS.jsonl",
    help="Draw the training curves of a run's metrics log into -o (no training).",
)
@click.option(
    "--recipe",
    type=click.Choice(["onecycle", "paper"]),
    default="onecycle",
    show_default=True,
    help="onecycle: warm-up, then annealing to the end of the budget; paper: SGD with a "
    "short warm-up, lr /10 on plateau.",
)
@click.option(
    "--arch",
    type=click.Choice(["torchvision", "paper", "cifar"]),
    default="torchvision",
    show_default=True,
    help="paper: 96-256-384-384-256 filters with LRN; cifar: a 32-px network with small "
    "kernels and a 4608-d fc7.",
)
@click.option("--batch-norm", is_flag=True, help="Batch norm after every conv and hidden FC layer.")
@click.option(
    "--groups",
    type=click.Choice(["1", "2"]),
    default="1",
    show_default=True,
    help="2: the paper's two-GPU split (conv2, conv4, conv5 see only their own half).",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=10),
    default=None,
    help="Network input side; crops are cut from round(size*256/224) squares "
    "[default: 224; 32 for --arch cifar; chosen by --time-budget].",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimizer steps in total [default: at least 1,000 and 30 epochs, at most 100 "
    "epochs, rounded to whole epochs].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Passes over the training set, instead of --steps.",
)
@click.option(
    "--time-budget",
    default=None,
    metavar="DURATION",
    help="Fit training into this time on this device (10m, 90s, 1h): times a few steps and "
    "picks the image size and steps, and says what it chose.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="[default: the power of two nearest (training images / 16), within 16..128]",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate (onecycle: the peak) [default: 0.01 for both recipes, /10 "
    "when fine-tuning].",
)
@click.option(
    "--finetune",
    default=None,
    metavar="imagenet|PATH",
    help="Start from torchvision's ImageNet weights, or from any AlexNet checkpoint (or "
    "torchvision state dict) whatever its classes: conv and FC layers kept, a new last layer.",
)
@click.option(
    "--freeze",
    type=click.Choice(["features"]),
    default=None,
    help="With --finetune: train only the classifier.",
)
@click.option(
    "--init",
    "init",
    type=click.Choice(["lsuv", "kaiming", "paper", "default"]),
    default="lsuv",
    show_default=True,
    help="Initial weights: He et al.'s scaled so each layer's output has unit size on training "
    "images (LSUV); He et al.'s alone; the paper's N(0, 0.01) with unit biases (stalls at "
    "ln(classes) without batch norm); torchvision's default (slow to start).",
)
@click.option(
    "--select",
    type=click.Choice(["map", "top1"]),
    default="map",
    show_default=True,
    help="Keep the epoch with the best validation fc7 retrieval mAP, or top-1 accuracy.",
)
@click.option(
    "--clip-norm",
    type=click.FloatRange(min=0),
    default=None,
    help="Clip the gradient norm to this (0: off) [default: 10].",
)
@click.option("--no-pca-color", is_flag=True, help="Leave out the PCA colour augmentation.")
@click.option("--no-random-crop", is_flag=True, help="Train on centre crops (flips stay).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Hold out this share of the training images (stratified) "
    "[default: use val/ or test/, idx t10k; 0.1 for one folder of classes].",
)
@click.option(
    "--subset",
    type=click.IntRange(min=1),
    default=None,
    help="Train on this many images only (stratified), for quick runs.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=0,
    help="Also save every N steps [default: at the end of an epoch, once a minute at most].",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after N steps in total (with a checkpoint); --resume continues.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run saved in --output, with the recipe it was started with.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a file already at --output (a fresh run otherwise refuses to).",
)
@device_option
@precision_option
@workers_option
@json_option
def train_command(
    data_dir,
    output,
    plot_log,
    recipe,
    arch,
    batch_norm,
    groups,
    image_size,
    steps,
    epochs,
    time_budget,
    batch_size,
    lr,
    finetune,
    freeze,
    init,
    select,
    clip_norm,
    no_pca_color,
    no_random_crop,
    seed,
    val_fraction,
    subset,
    checkpoint_every,
    max_steps,
    resume,
    overwrite,
    device,
    precision,
    workers,
    as_json,
):
    """Train AlexNet on DATA_DIR (train/ and val/ class folders, one folder of classes, or the
    four idx files of (Fashion-)MNIST) and write a checkpoint for `retrieve index --weights`."""
    from retrieval.figures.curves import curves_path, read_metrics, save_curves

    if plot_log is not None:
        if data_dir is not None:
            raise click.UsageError("--plot draws a log: leave out DATA_DIR")
        save_curves(read_metrics(plot_log), output, title=plot_log.name)
        click.echo(str(output))
        return
    if data_dir is None:
        raise click.UsageError("give DATA_DIR (or --plot METRICS.jsonl)")
    from retrieval.training.augment import Augmentation
    from retrieval.training.budget import parse_duration
    from retrieval.training.loop import describe_epoch, make_recipe, metrics_log_path, train
    from retrieval.training.prepare import RunOptions, refuse_to_replace

    if not (resume or overwrite):
        refuse_to_replace(output)
    curves = curves_path(output)

    def on_epoch(row: dict) -> None:
        click.echo(describe_epoch(row), err=True)
        # Redrawn from the log each epoch, so a long run's picture can be opened as it goes.
        save_curves(read_metrics(metrics_log_path(output)), curves, title=output.name)

    if freeze and not finetune:
        raise click.UsageError("--freeze needs --finetune")
    if steps and epochs:
        raise click.UsageError("give --steps or --epochs, not both")
    seconds = parse_duration(time_budget) if time_budget else None
    if seconds and (steps or epochs):
        raise click.UsageError("--time-budget chooses the steps: leave out --steps and --epochs")
    size_given = image_size is not None
    if image_size is None:
        image_size = 32 if arch == "cifar" else 224
    augmentation = Augmentation(random_crop=not no_random_crop, pca_color=not no_pca_color)
    chosen = make_recipe(
        recipe,
        arch=arch,
        batch_norm=batch_norm,
        groups=int(groups),
        image_size=image_size,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        finetune=finetune,
        freeze=freeze,
        init=init,
        select=select,
        clip_norm=clip_norm,
        augmentation=augmentation,
        seed=seed,
        val_fraction=val_fraction,
        subset=subset,
    )
    with stage_bars() as bars:
        options = RunOptions(
            device=device,
            precision=precision,
            workers=workers,
            checkpoint_every=checkpoint_every,
            max_steps=max_steps,
            resume=resume,
            time_budget=seconds,
            image_size_given=size_given,
            progress=bars,
        )
        result = train(
            data_dir,
            output,
            chosen,
            options,
            on_epoch=on_epoch,
            on_start=lambda line: click.echo(line, err=True),
        )
    summary = {
        "checkpoint": str(result.checkpoint),
        "metrics_log": str(result.metrics_log),
        "curves": str(curves) if curves.exists() else None,
        "epochs": result.epochs,
        "finished": result.finished,
        "seconds": result.seconds,
        "recipe": result.recipe.to_dict() if result.recipe else None,
        "best": result.best,
        "plan": result.plan,
        **{k: v for k, v in result.last.items() if k != "epoch"},
    }
    if as_json:
        emit_json(summary)
        return
    last = result.last
    state = "finished" if result.finished else "stopped (continue with --resume)"
    click.echo(
        f"{result.checkpoint}: {state} after {counted(result.epochs, 'epoch')} "
        f"in {result.seconds:.0f} s"
    )
    if last:
        click.echo(
            f"val top-1 error {100 * last['top1_error']:.2f}%"
            + (f", top-5 error {100 * last['top5_error']:.2f}%" if "top5_error" in last else "")
            + (f", fc7 mAP {last['map']:.3f}" if "map" in last else "")
        )
    if result.best:
        best = result.best
        click.echo(f"kept epoch {best['epoch']} (best {best['select']}: {best['score']:.3f})")
    if curves.exists():
        click.echo(f"curves: {curves}")


def register(group: click.Group) -> None:
    group.add_command(train_command)
