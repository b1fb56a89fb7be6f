"""Options that several commands share, defined once so their names, defaults and help agree.

``json_option`` and ``emit_json`` live together: the flag chooses the printer. Options that only one
command has stay beside that command, even where the name repeats (``index --precision`` takes
other choices than ``train --precision``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from retrieval.devices import usable_cores
from retrieval.units import counted

DEFAULT_K = 6

index_option = click.option(
    "--index",
    "index_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Index directory [default: $RETRIEVE_INDEX or ./.retrieve].",
)


class DeviceType(click.ParamType):
    """auto, cpu, cuda or cuda:N, read by the one parser of device strings."""

    name = "auto|cpu|cuda[:N]"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from retrieval.devices import parse_device
        from retrieval.errors import RetrieveError

        try:
            parse_device(value)
        except RetrieveError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


device_option = click.option(
    "--device",
    type=DeviceType(),
    default="auto",
    show_default=True,
    help="Where to run the model: auto, cpu, cuda or cuda:N.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")

k_option = click.option(
    "-k",
    type=click.IntRange(min=1),
    default=DEFAULT_K,
    show_default=True,
    help="Number of neighbours per query.",
)
weights_option = click.option(
    "--weights",
    default=None,
    help="imagenet, random[:SEED] or a checkpoint / state-dict file "
    "[default: the index's own model; imagenet for a new index].",
)
search_options = [
    click.option(
        "--nprobe",
        type=click.IntRange(min=1),
        default=None,
        help="IVF lists to visit per query (approximate indexes).",
    ),
    click.option(
        "--ef-search",
        type=click.IntRange(min=1),
        default=None,
        help="HNSW candidate list size per query.",
    ),
]

# Training and classifier evaluation run the same model loop, so they take the same two knobs.
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


def neighbours_found(results: list, k: int, indexed: int) -> int:
    """The most neighbours any result got, saying on stderr why when that is fewer than ``k``:
    the index (of ``indexed`` images) holds no more, or an approximate search found no more."""
    found = max((len(r.neighbors) for r in results), default=0)
    if any(r.neighbors for r in results) and found < k:
        why = (
            f"the index holds {counted(indexed, 'image')}"
            if found >= indexed - 1  # a query's own row is left out of a grid
            else "the approximate search found no more (raise --nprobe or --ef-search)"
        )
        click.echo(f"only {counted(found, 'neighbour')} of the {k} asked: {why}", err=True)
    return found


def with_options(options: list) -> Callable:
    """Apply a list of options as one decorator, in the order listed (as ``--help`` shows them)."""

    def wrap(function):
        for option in reversed(options):
            function = option(function)
        return function

    return wrap


def display_path(path: str) -> str:
    """Relative to the current directory when below it, so it opens from here as printed.
    (The library and ``--json`` give absolute paths.)"""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else relative


def emit_json(data: object) -> None:
    # ASCII escapes keep any file name (even one that is not valid UTF-8) exact and parseable.
    click.echo(json.dumps(data, ensure_ascii=True))


def open_index(
    index_dir: Path | None,
    weights: str | None = None,
    device: str = "auto",
    search_precision: str = "fp32",
    **extract: Any,
) -> Any:
    """The one way a command opens its :class:`retrieval.Index`: embedding on ``device`` with
    every usable core (``extract``: other :class:`ExtractOptions` fields, e.g. batch_size)."""
    from retrieval import Index
    from retrieval.extraction.types import ExtractOptions

    options = ExtractOptions(device=device, threads=usable_cores(), **extract)
    return Index.open(
        index_dir,
        weights=weights,
        device=device,
        extract=options,
        search_precision=search_precision,
    )
