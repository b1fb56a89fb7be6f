"""The ``retrieve`` command: parse, call ``retrieval.Index`` (or a stage below it), print.

Results go to stdout (``--json`` for machines); logs and progress bars go to stderr. Library
errors become one line and exit 1; bad arguments exit 2 (click's usage errors). Heavy modules are
imported inside the commands so ``retrieve --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

import click

from retrieval.errors import RetrieveError


class RetrieveGroup(click.Group):
    """Turns library errors into one line on stderr instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrieveError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            if exc.name != "faiss":
                raise
            raise click.ClickException(
                "faiss is not installed: pip install 'retrieve[cpu]' (or 'retrieve[gpu]', the "
                "GPU build; the two are alternatives)"
            ) from None
        except BrokenPipeError:  # `retrieve query ... | head`: the reader has what it wanted
            _quiet_stdout()
            sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command a pipe cut short
        except OSError as exc:  # the machine's answer: a folder that cannot be made, a full disk
            from retrieval.images.diagnose import describe_os_error

            logging.getLogger(__name__).info("the error in full", exc_info=True)  # with -v
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(where + describe_os_error(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; finished chunks are kept and the next run resumes", err=True)
            sys.exit(130)


def _quiet_stdout() -> None:
    """Python flushes stdout on its way out; into a closed pipe that is a second error. (Not a
    real file, as under a test's capture: nothing to flush into a pipe.)"""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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


def _register() -> None:
    from . import (
        collection_cmds,
        demo_cmds,
        duplicates_cmds,
        eval_cmds,
        extract_cmds,
        figure_cmds,
        index_cmds,
        query_cmds,
        serve_cmds,
        train_cmds,
    )

    for module in (
        index_cmds,
        query_cmds,
        figure_cmds,
        duplicates_cmds,
        collection_cmds,
        serve_cmds,
        eval_cmds,
        train_cmds,
        extract_cmds,
        demo_cmds,
    ):
        module.register(cli)


_register()
