"""``query``: the K nearest indexed images of each query image, as text or JSON."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    device_option,
    display_path,
    emit_json,
    index_option,
    json_option,
    k_option,
    neighbours_found,
    open_index,
    search_options,
    weights_option,
    with_options,
)


@click.command("query")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@k_option
@index_option
@weights_option
@device_option
@with_options(search_options)
@json_option
def query_command(images, k, index_dir, weights, device, nprobe, ef_search, as_json):
    """List the K nearest indexed images of each query image (files or folders)."""
    with open_index(index_dir, weights, device) as index:
        results = index.search(images, k, nprobe=nprobe, ef_search=ef_search)
        indexed = index.count
    for result in results:
        if as_json:
            emit_json(result.to_dict())
        elif result.error:
            click.echo(
                f"{display_path(result.query)}: cannot use this image: {result.error}", err=True
            )
        else:
            click.echo(display_path(result.query))
            for n in result.neighbors:
                path = display_path(n.path)
                click.echo(f"  {n.rank:>3}  {n.distance:10.4f}  {path}  [{n.label}]")
    neighbours_found(results, k, indexed)
    failed = [r for r in results if r.error]
    if failed and len(failed) == len(results):
        raise click.ClickException(f"no query image could be used ({failed[0].error})")


def register(group: click.Group) -> None:
    group.add_command(query_command)
