"""``grid`` and ``visualize``: the paper's figures, Figure 4 (neighbours) and Figure 3 (kernels)."""

from __future__ import annotations

from pathlib import Path

import click

from retrieval.units import counted

from .options import (
    device_option,
    display_path,
    index_option,
    k_option,
    neighbours_found,
    open_index,
    search_options,
    weights_option,
    with_options,
)


@click.command("grid")
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("grid.png"),
    show_default=True,
)
@k_option
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Images picked at random from each query folder.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tile", type=click.IntRange(min=32), default=128, show_default=True)
@index_option
@weights_option
@device_option
@with_options(search_options)
def grid_command(queries, output, k, n, seed, tile, index_dir, weights, device, nprobe, ef_search):
    """Draw the paper's Figure 4: each query beside its K nearest images."""
    with open_index(index_dir, weights, device) as index:
        path, results = index.grid(
            queries, output, k=k, n=n, seed=seed, tile=tile, nprobe=nprobe, ef_search=ef_search
        )
        indexed = index.count
    for result in results:
        if result.error:
            query = display_path(result.query)
            click.echo(f"{query}: cannot use this image: {result.error}", err=True)
    drawn = counted(sum(1 for r in results if r.neighbors), "query", "queries")
    shown = counted(neighbours_found(results, k, indexed), "neighbour")
    click.echo(f"wrote {path} ({drawn} x {shown})")


@click.command("visualize")
@click.option(
    "--weights",
    default=None,
    help="imagenet, random[:SEED] or a checkpoint [default: the model of --index].",
)
@index_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PNG to write [default: kernels.png, or feature-maps.png with --image].",
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
def visualize_command(weights, index_dir, output, image, layer, scale, device):
    """The conv1 kernels as coloured patches (the paper's Figure 3), or the feature maps of one
    layer for --image; of --weights, else of the model the index was built with."""
    from contextlib import nullcontext

    from retrieval.errors import IndexNotFoundError
    from retrieval.figures import kernels as visualize

    if output is None:
        output = Path("kernels.png" if image is None else "feature-maps.png")
    try:
        opened = nullcontext() if weights else open_index(index_dir, device=device)
    except IndexNotFoundError as exc:
        raise click.UsageError(f"{exc}; or name a model with --weights") from None
    with opened as ix:
        model = weights or ix.model
        if image is None:
            path = visualize.draw_kernels(model, output, scale=scale, device=device)
        else:
            path = visualize.draw_feature_maps(
                model, image, output, layer=layer, scale=scale, device=device
            )
    click.echo(str(path))


def register(group: click.Group) -> None:
    for command in (grid_command, visualize_command):
        group.add_command(command)
