"""``duplicates``: exact copies and verified copies of the indexed collection (and, when asked,
similar images), reported, moved or linked (never deleted), with an undo log; the user's "not a
duplicate" decisions remembered; ``--calibrate`` measures what the pass finds on this collection."""

from __future__ import annotations

import os
from pathlib import Path

import click

from retrieval.units import counted

from .options import (
    device_option,
    display_path,
    emit_json,
    index_option,
    json_option,
    open_index,
    weights_option,
)
from .progress import progress_bar, stage_bars


@click.command("duplicates")
@index_option
@json_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Draw a contact sheet of the groups (PNG).",
)
@click.option(
    "--similar",
    is_flag=True,
    help="Also show similar images: fc7-close but not verified copies (bursts, re-shoots).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=None,
    help="With --similar: their fc7 distance [default: calibrated on this collection].",
)
@click.option(
    "--reference",
    "references",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A folder whose files always lead their group and are never moved or linked (repeatable).",
)
@click.option(
    "--keep",
    type=click.Choice(["best", "largest", "oldest", "first"]),
    default="best",
    show_default=True,
    help="Which member leads a group: best = most pixels, then colour, then not a palette "
    "(GIF) copy, then sharpest, then lossless, then with EXIF, then largest file.",
)
@click.option(
    "--action",
    type=click.Choice(["report", "move", "hardlink", "symlink"]),
    default="report",
    show_default=True,
    help="report is a dry run; the others need --to and write an undo log (exact and verified "
    "copies only: similar images are never acted on).",
)
@click.option(
    "--to",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder the duplicates are moved to, outside the collection (nothing is ever deleted).",
)
@click.option(
    "--undo",
    "undo_log",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Reverse the actions recorded in this log, and stop.",
)
@click.option(
    "--not-duplicate",
    "not_duplicate",
    nargs=2,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Remember that these two files are not duplicates (by content: renames, moves and "
    "re-indexes keep it), and stop.",
)
@click.option(
    "--forget-decisions",
    is_flag=True,
    help="Forget every --not-duplicate decision of this index, and stop.",
)
@click.option(
    "--reverify",
    is_flag=True,
    help="Open every candidate pair's pictures again instead of taking the verdicts an earlier "
    "pass kept (those are used only for the same files and the same verifier).",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Edit a sample of the collection every way copies drift, measure what is found, "
    "print it, draw the fc7 distance histogram, and stop.",
)
@click.option(
    "--histogram",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("calibration.png"),
    show_default=True,
    help="With --calibrate: where the histogram goes.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=3),
    default=100,
    show_default=True,
    help="Images edited to calibrate (nine copies each).",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "exact", "pca", "ivf"]),
    default="auto",
    show_default=True,
    help="The similar pass: full vectors, a PCA copy (same pairs), or IVF.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@weights_option
@device_option
def duplicates_command(
    index_dir,
    as_json,
    output,
    similar,
    threshold,
    references,
    keep,
    action,
    target,
    undo_log,
    not_duplicate,
    forget_decisions,
    reverify,
    calibrate,
    histogram,
    sample,
    method,
    seed,
    weights,
    device,
):
    """Find exact copies (same bytes) and copies (one picture edited: re-encoded, resized,
    cropped, mirrored, turned, bordered, captioned, recoloured), each pair verified."""
    from retrieval.collection.near import NearOptions
    from retrieval.duplicates import actions
    from retrieval.duplicates.calibration import CalibrationOptions
    from retrieval.duplicates.groups import DuplicateOptions, find_duplicates

    if undo_log is not None:
        report = actions.undo(undo_log)
        for problem in report.problems:
            click.echo(f"not restored: {display_path(problem)}", err=True)
        click.echo(
            f"restored {counted(len(report.done), 'file')} from {display_path(str(undo_log))}"
        )
        if report.problems:
            raise click.ClickException(
                f"{counted(len(report.problems), 'file')} could not be restored"
            )
        return
    if action != "report" and target is None:
        raise click.UsageError(f"--action {action} needs --to DIR (where the duplicates go)")
    if threshold is not None and not similar:
        raise click.UsageError("--threshold is the similar images' fc7 distance: add --similar")
    with open_index(index_dir, weights, device) as ix:
        if not_duplicate is not None or forget_decisions:
            _decide(ix.directory, not_duplicate, forget_decisions)
            return
        options = CalibrationOptions(sample=sample, seed=seed)
        if calibrate or (similar and threshold is None):
            result = _calibrated(ix, options, histogram if calibrate else None, as_json)
            if calibrate:
                return
            threshold = result.threshold
        wanted = DuplicateOptions(
            keep=keep,
            references=tuple(str(r) for r in references),
            similar_threshold=threshold if similar else None,
            near=NearOptions(method=method, seed=seed),
            remember=not reverify,
        )
        with stage_bars("pairs") as bar:
            report = find_duplicates(ix, wanted, progress=bar)
    if as_json:
        for group in report.groups:
            emit_json(group.to_dict())
    else:
        click.echo(report.summary())
        for group in report.groups:
            click.echo(f"group {group.number} ({group.kind}, {len(group.members)} files):")
            for n, member in enumerate(group.members):
                mark = _mark(n, member, group.kind)
                click.echo(f"  {mark:>6}  {display_path(member.path)}{_how(member)}")
    if output is not None and report.groups:
        from retrieval.duplicates.sheet import duplicate_sheet

        click.echo(f"wrote {duplicate_sheet(report, output)}", err=True)
    if action == "report":
        if report.groups and not as_json:
            click.echo("(dry run: nothing moved; --action move --to DIR moves the duplicates)")
        return
    done = actions.apply([g for g in report.groups if g.kind != "similar"], action, target)
    for problem in done.problems:
        click.echo(f"left alone: {problem}", err=True)
    click.echo(
        f"{action}: {counted(len(done.done), 'file')} to {display_path(str(target))}; undo with "
        f"retrieve duplicates --undo {display_path(str(done.log))}; "
        "run retrieve index again to update the index",
        err=True,
    )


def _mark(n: int, member, kind: str) -> str:
    """The column before a member's path: keep / ref / same / its fc7 distance."""
    if member.reference:
        return "ref"
    if n == 0:
        return "keep"
    return "same" if kind == "exact" else f"{member.distance:.2f}"


def _how(member) -> str:
    """What made a member a copy (the verifier's edits), after its path."""
    if not member.evidence:
        return ""
    return f"  ({', '.join(member.evidence['edits'])})"


def _decide(index_dir, pair, forget: bool) -> None:
    from retrieval.duplicates.actions import sha256_of
    from retrieval.duplicates.memory import DuplicatesMemory

    memory = DuplicatesMemory(index_dir)
    try:
        if memory.in_memory:
            raise click.ClickException(f"cannot write {memory.path}: nothing can be remembered")
        if forget:
            click.echo(f"forgot {counted(memory.forget_decisions(), 'not-duplicate decision')}")
            return
        from retrieval.images.walk import is_image_path

        for path in pair:
            if not is_image_path(path):
                raise click.UsageError(f"{path} is not an image file: --not-duplicate takes two")
        first, second = ((sha256_of(p), os.path.abspath(p)) for p in pair)
        if not memory.record_not_duplicate(first, second):
            raise click.UsageError("those two files have the same bytes: they are exact copies")
        click.echo(
            f"remembered: {display_path(first[1])} and {display_path(second[1])} are not "
            "duplicates (--forget-decisions forgets it)"
        )
    finally:
        memory.close()


def _calibrated(ix, options, histogram, as_json):
    from retrieval.duplicates.calibration import calibrate

    with progress_bar("calibrating", "images") as bar:
        result = calibrate(ix, options, progress=bar)
    message = (
        f"verified copies: recall {result.recall:.3f}, precision {result.precision:.3f} "
        f"({result.false_copies} false copies among {result.negatives_checked} nearest other "
        f"images), measured on {result.sampled} sampled images x {len(result.per_edit)} edits"
    )
    if histogram is None:
        click.echo(message, err=True)
        return result
    if as_json:
        emit_json(
            {
                "recall": result.recall,
                "precision": result.precision,
                "false_copies": result.false_copies,
                "negatives_checked": result.negatives_checked,
                "sampled": result.sampled,
                "edits": {
                    name: {
                        "copies": t.copies,
                        "proposed": t.proposed,
                        "verified": t.verified,
                        "recall": t.recall,
                    }
                    for name, t in result.per_edit.items()
                },
                "similar_threshold": result.threshold,
                "similar_table": [
                    dict(zip(("threshold", "precision", "recall"), row)) for row in result.table()
                ],
            }
        )
    else:
        click.echo(message)
        click.echo(f"{'edit':<12} {'copies':>6} {'proposed':>9} {'verified':>9} {'recall':>7}")
        for name, t in result.per_edit.items():
            click.echo(f"{name:<12} {t.copies:>6} {t.proposed:>9} {t.verified:>9} {t.recall:>7.3f}")
        click.echo(f"similar images (--similar): fc7 within {result.threshold:.3f}")
    from retrieval.figures.sheets import draw_histogram

    path = draw_histogram(
        {
            "edited copy to its original": result.positives,
            "nearest other image": result.nearest,
            "other images (beyond each one's nearest few)": result.negatives,
        },
        histogram,
        threshold=result.threshold,
        title=f"fc7 distances, {result.sampled} sampled images",
    )
    click.echo(f"wrote {path}", err=True)
    return result


def register(group: click.Group) -> None:
    group.add_command(duplicates_command)
