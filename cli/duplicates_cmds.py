"""``duplicates``: exact copies and near duplicates of the indexed collection, reported, moved
or linked (never deleted), with an undo log; ``--calibrate`` shows how the threshold is chosen."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    device_option,
    display_path,
    emit_json,
    index_option,
    json_option,
    open_index,
    weights_option,
)
from .progress import progress_bar


@click.command("duplicates")
@index_option
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=None,
    help="fc7 distance for near duplicates [default: calibrated on this collection].",
)
@json_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Draw a contact sheet of the groups (PNG).",
)
@click.option(
    "--action",
    type=click.Choice(["report", "move", "hardlink", "symlink"]),
    default="report",
    show_default=True,
    help="report is a dry run; the others need --to and write an undo log.",
)
@click.option(
    "--to",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder the duplicates are moved to (nothing is ever deleted).",
)
@click.option(
    "--keep",
    type=click.Choice(["largest", "oldest", "first"]),
    default="largest",
    show_default=True,
    help="Which member of a group is its representative.",
)
@click.option(
    "--undo",
    "undo_log",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Reverse the actions recorded in this log, and stop.",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Print the calibration table, draw the distance histogram, and stop.",
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
    default=300,
    show_default=True,
    help="Images edited to calibrate the threshold.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "exact", "pca", "ivf"]),
    default="auto",
    show_default=True,
    help="Near pass: full vectors, a PCA copy (same pairs), or IVF.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@weights_option
@device_option
def duplicates_command(
    index_dir,
    threshold,
    as_json,
    output,
    action,
    target,
    keep,
    undo_log,
    calibrate,
    histogram,
    sample,
    method,
    seed,
    weights,
    device,
):
    """Find exact copies (same bytes) and near duplicates (fc7 distance under a threshold)."""
    from retrieval.collection import actions
    from retrieval.collection.calibration import CalibrationOptions
    from retrieval.collection.near import NearOptions

    if undo_log is not None:
        report = actions.undo(undo_log)
        for problem in report.problems:
            click.echo(f"not restored: {display_path(problem)}", err=True)
        click.echo(f"restored {len(report.done)} files from {display_path(str(undo_log))}")
        if report.problems:
            raise click.ClickException(f"{len(report.problems)} files could not be restored")
        return
    if action != "report" and target is None:
        raise click.UsageError(f"--action {action} needs --to DIR (where the duplicates go)")
    options = CalibrationOptions(sample=sample, seed=seed)
    with open_index(index_dir, weights, device) as ix:
        if calibrate or threshold is None:
            result = _calibrated(ix, options, histogram if calibrate else None, as_json)
            if calibrate:
                return
            threshold = result.threshold
        from retrieval.collection.duplicates import find_duplicates

        with progress_bar("near pass", "blocks") as bar:
            report = find_duplicates(
                ix, threshold, keep=keep, near=NearOptions(method=method, seed=seed), progress=bar
            )
    if as_json:
        for group in report.groups:
            emit_json(group.to_dict())
    else:
        click.echo(report.summary())
        for group in report.groups:
            click.echo(f"group {group.number} ({group.kind}, {len(group.members)} files):")
            for n, member in enumerate(group.members):
                mark = "keep" if n == 0 else f"{member.distance:.2f}"
                click.echo(f"  {mark:>6}  {display_path(member.path)}")
    if output is not None and report.groups:
        from retrieval.collection.views import duplicate_sheet

        click.echo(f"wrote {duplicate_sheet(report, output)}", err=True)
    if action == "report":
        if report.groups and not as_json:
            click.echo("(dry run: nothing moved; --action move --to DIR moves the duplicates)")
        return
    done = actions.apply(report.groups, action, target)
    for problem in done.problems:
        click.echo(f"left alone: {problem}", err=True)
    click.echo(
        f"{action}: {len(done.done)} files to {display_path(str(target))}; undo with "
        f"retrieve duplicates --undo {display_path(str(done.log))}; "
        "run retrieve index again to update the index",
        err=True,
    )


def _calibrated(ix, options, histogram, as_json):
    import numpy as np

    from retrieval.collection.calibration import calibrate

    with progress_bar("calibrating", "images") as bar:
        result = calibrate(ix, options, progress=bar)
    message = (
        f"threshold {result.threshold:.3f}: precision {result.precision:.3f}, recall "
        f"{result.recall:.3f} on {result.sampled} sampled images x 4 edits"
    )
    if histogram is None:
        click.echo(message, err=True)
        return result
    if as_json:
        emit_json(
            {
                "threshold": result.threshold,
                "precision": result.precision,
                "recall": result.recall,
                "sampled": result.sampled,
                "table": [
                    dict(zip(("threshold", "precision", "recall"), row)) for row in result.table()
                ],
            }
        )
    else:
        click.echo(message)
        click.echo(f"{'threshold':>10} {'precision':>10} {'recall':>8}")
        for t, p, r in result.table():
            click.echo(f"{t:>10.3f} {p:>10.3f} {r:>8.3f}")
        for name, gaps in result.edits.items():
            if len(gaps):
                found = float((gaps <= result.threshold).mean())
                click.echo(
                    f"  {name:<10} found {found:.3f} (median distance {np.median(gaps):.2f})"
                )
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
