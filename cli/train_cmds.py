"""``train``: parse the recipe options, call ``retrieval.train``, print the last epoch."""

from __future__ import annotations

from pathlib import Path

import click

from .options import device_option, emit_json, json_option, precision_option, workers_option


@click.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint to write (a .metrics.jsonl log goes next to it).",
)
@click.option(
    "--recipe",
    type=click.Choice(["paper", "onecycle"]),
    default="paper",
    show_default=True,
    help="paper: SGD, lr /10 on plateau; onecycle: short budgets.",
)
@click.option(
    "--arch",
    type=click.Choice(["torchvision", "paper"]),
    default="torchvision",
    show_default=True,
    help="paper: 96-256-384-384-256 filters with LRN.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=63),
    default=224,
    show_default=True,
    help="Network input side; crops are cut from round(size*256/224) squares.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="[default: 90 for paper, 16 for onecycle]",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate (onecycle: the peak) [default: 0.01 for both recipes, /10 "
    "when fine-tuning].",
)
@click.option(
    "--finetune",
    type=click.Choice(["imagenet"]),
    default=None,
    help="Start from torchvision's ImageNet weights with a new last layer.",
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
    type=click.Choice(["kaiming", "paper", "default"]),
    default="kaiming",
    show_default=True,
    help="Initial weights: He et al.'s; the paper's N(0, 0.01) with unit biases (stalls at "
    "ln(classes) without batch norm); torchvision's default (slow to start).",
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
    help="Also save every N steps [default: at the end of each epoch].",
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
@device_option
@precision_option
@workers_option
@json_option
def train_command(
    data_dir,
    output,
    recipe,
    arch,
    image_size,
    epochs,
    batch_size,
    lr,
    finetune,
    freeze,
    init,
    no_pca_color,
    no_random_crop,
    seed,
    val_fraction,
    subset,
    checkpoint_every,
    max_steps,
    resume,
    device,
    precision,
    workers,
    as_json,
):
    """Train AlexNet on DATA_DIR (train/ and val/ class folders, one folder of classes, or the
    four idx files of (Fashion-)MNIST) and write a checkpoint for `retrieve index --weights`."""
    from retrieval.training.augment import Augmentation
    from retrieval.training.loop import describe_epoch, make_recipe, train
    from retrieval.training.setup import RunOptions

    if freeze and not finetune:
        raise click.UsageError("--freeze needs --finetune")
    augmentation = Augmentation(random_crop=not no_random_crop, pca_color=not no_pca_color)
    chosen = make_recipe(
        recipe,
        arch=arch,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        finetune=finetune,
        freeze=freeze,
        init=init,
        augmentation=augmentation,
        seed=seed,
        val_fraction=val_fraction,
        subset=subset,
    )
    options = RunOptions(
        device=device,
        precision=precision,
        workers=workers,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
        resume=resume,
    )
    result = train(
        data_dir,
        output,
        chosen,
        options,
        on_epoch=lambda row: click.echo(describe_epoch(row), err=True),
    )
    summary = {
        "checkpoint": str(result.checkpoint),
        "metrics_log": str(result.metrics_log),
        "epochs": result.epochs,
        "finished": result.finished,
        "seconds": result.seconds,
        **{k: v for k, v in result.last.items() if k != "epoch"},
    }
    if as_json:
        emit_json(summary)
        return
    last = result.last
    state = "finished" if result.finished else "stopped (continue with --resume)"
    click.echo(
        f"{result.checkpoint}: {state} after {result.epochs} epochs in {result.seconds:.0f} s"
    )
    if last:
        click.echo(
            f"val top-1 error {100 * last['top1_error']:.2f}%, "
            f"top-5 error {100 * last['top5_error']:.2f}%"
        )


def register(group: click.Group) -> None:
    group.add_command(train_command)
