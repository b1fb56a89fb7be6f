"""``train``, ``evaluate``, ``visualize`` and ``demo``: parse, call one library function, print."""

from __future__ import annotations

from pathlib import Path

import click

from .main import DEFAULT_K, device_option, emit_json, index_option, json_option

precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on CUDA, fp32 on the CPU.",
)
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decoder processes for image folders [default: one per core].",
)


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
    from retrieval.augment import Augmentation
    from retrieval.train import RunOptions, describe_epoch, make_recipe, train

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


@click.command("evaluate")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--weights", default=None, help="Checkpoint to evaluate as a classifier.")
@index_option
@click.option(
    "--retrieval",
    is_flag=True,
    help="Evaluate retrieval instead: DATA_DIR's labelled images against --index.",
)
@click.option(
    "-k",
    type=click.IntRange(min=1),
    default=DEFAULT_K,
    show_default=True,
    help="Neighbours for precision@k (with --retrieval).",
)
@click.option(
    "--map-depth",
    type=click.IntRange(min=1),
    default=None,
    help="With --retrieval: rank this many neighbours for mAP [default: the whole index].",
)
@click.option(
    "--ten-crop/--no-ten-crop",
    default=True,
    show_default=True,
    help="Also average the paper's ten crops.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@device_option
@precision_option
@workers_option
@json_option
def evaluate_command(
    data_dir,
    weights,
    index_dir,
    retrieval,
    k,
    map_depth,
    ten_crop,
    batch_size,
    device,
    precision,
    workers,
    as_json,
):
    """Top-1/top-5 of --weights on DATA_DIR (idx test split, val/, test/ or the folder), or with
    --retrieval precision@k and mAP of DATA_DIR's images against an index (same label =
    relevant)."""
    if retrieval:
        from retrieval import api

        extract = api.ExtractOptions(
            device=device,
            batch_size=batch_size,
            workers=workers,
            precision="bf16" if precision == "bf16" else "fp32",
        )
        report = api.evaluate_retrieval(
            index_dir, data_dir, k=k, map_depth=map_depth, extract=extract
        )
        data = report.to_dict()
        if as_json:
            emit_json(data)
        else:
            for key, value in data.items():
                click.echo(f"{key}: {value}")
        return
    if not weights:
        raise click.UsageError("give --weights (classifier) or --retrieval (index)")
    from retrieval.evaluate import evaluate_classifier

    report = evaluate_classifier(
        weights,
        data_dir,
        device=device,
        batch_size=batch_size,
        ten_crop=ten_crop,
        precision=precision,
        workers=workers,
    )
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"{report.images} images: top-1 {100 * report.top1:.2f}%, "
        f"top-5 {100 * report.top5:.2f}% (centre crop)"
    )
    if report.top1_ten_crop is not None:
        click.echo(
            f"ten crops: top-1 {100 * report.top1_ten_crop:.2f}%, "
            f"top-5 {100 * report.top5_ten_crop:.2f}%"
        )
    for name, accuracy in report.per_class.items():
        click.echo(f"  {name}: {100 * accuracy:.1f}%")


@click.command("visualize")
@click.option("--weights", required=True, help="imagenet, random[:SEED] or a checkpoint.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="PNG to write.",
)
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Show this image's feature maps instead of the conv1 kernels.",
)
@click.option(
    "--layer",
    default="conv1",
    show_default=True,
    help="With --image: conv1..conv5, pool1, pool2, pool5 or a module name.",
)
@click.option(
    "--scale",
    type=click.IntRange(min=1),
    default=None,
    help="Pixels per kernel / map pixel [default: fit about 1000 px].",
)
@device_option
def visualize_command(weights, output, image, layer, scale, device):
    """The conv1 kernels as coloured patches (the paper's Figure 3), or the feature maps of one
    layer for --image."""
    from retrieval import visualize

    if image is None:
        path = visualize.draw_kernels(weights, output, scale=scale, device=device)
    else:
        path = visualize.draw_feature_maps(
            weights, image, output, layer=layer, scale=scale, device=device
        )
    click.echo(str(path))


@click.command("demo")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Fashion-MNIST idx folder [default: ../shared/datasets/fashion-mnist, else download].",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="[default: 2 on a CPU (fits 10 minutes on 2 cores), 10 on a GPU]",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=63),
    default=None,
    help="[default: 64 on the CPU, 224 on a GPU]",
)
@click.option(
    "--subset",
    type=click.IntRange(min=0),
    default=None,
    help="Train on this many of the 60,000 training images (0: all) [default: 40,000 on a CPU].",
)
@device_option
@json_option
def demo_command(data, out_dir, epochs, image_size, subset, device, as_json):
    """Reproduce the paper's experiment on Fashion-MNIST: train, index the training images by
    fc7, draw test images beside their six nearest training images, report top-1 and
    precision@6."""
    from retrieval.demo import run_demo

    report = run_demo(
        data,
        out_dir,
        epochs=epochs,
        image_size=image_size,
        subset=subset,
        device=device,
        progress=lambda message: click.echo(message, err=True),
    )
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.summary())


def register(group: click.Group) -> None:
    for command in (train_command, evaluate_command, visualize_command, demo_command):
        group.add_command(command)
