"""The ``retrieve`` command: parse, call ``retrieval.api``, print.

Results go to stdout (``--json`` for machines); logs and progress bars go to stderr. Library
errors become one line and exit 1; bad arguments exit 2 (click's usage errors). Heavy modules are
imported inside the commands so ``retrieve --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from retrieval.errors import RetrieveError

DEFAULT_K = 6


class RetrieveGroup(click.Group):
    """Turns library errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrieveError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; finished chunks are kept and the next run resumes", err=True)
            sys.exit(130)


@click.group(cls=RetrieveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details and stage timings.")
@click.version_option(package_name="retrieve")
def cli(verbose: bool) -> None:
    """Find similar images by AlexNet fc7 features (Krizhevsky et al. 2012) and FAISS."""
    for stream in (sys.stdout, sys.stderr):
        # File names that are not valid UTF-8 print as their original bytes, not a crash.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def emit_json(data: object) -> None:
    # ASCII escapes keep any file name (even one that is not valid UTF-8) exact and parseable.
    click.echo(json.dumps(data, ensure_ascii=True))


index_option = click.option(
    "--index",
    "index_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Index directory [default: $RETRIEVE_INDEX or ./.retrieve].",
)
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run the model.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def _register() -> None:
    from . import index_cmds, train_cmds

    index_cmds.register(cli)
    train_cmds.register(cli)


_register()
