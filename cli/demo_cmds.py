"""``demo``: the paper's experiment end to end on Fashion-MNIST, in one command."""

from __future__ import annotations

from pathlib import Path

import click

from .options import device_option, emit_json, json_option
from .progress import stage_bars


@click.command("demo")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Fashion-MNIST idx folder [default: ../shared/datasets/fashion-mnist, else download].",
)
@click.option(
    "-o",
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

    with stage_bars() as bars:
        report = run_demo(
            data,
            out_dir,
            epochs=epochs,
            image_size=image_size,
            subset=subset,
            device=device,
            progress=lambda message: click.echo(message, err=True),
            bars=bars,
        )
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(report.summary())


def register(group: click.Group) -> None:
    group.add_command(demo_command)
