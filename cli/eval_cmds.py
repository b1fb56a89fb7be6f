"""``evaluate`` and ``recall``: measure a classifier, retrieval, or an approximate index."""

from __future__ import annotations

from pathlib import Path

import click

from retrieval.units import counted, human_bytes

from .options import (
    DEFAULT_K,
    device_option,
    emit_json,
    index_option,
    json_option,
    open_index,
    precision_option,
    search_options,
    with_options,
    workers_option,
)
from .progress import stage_bars


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
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --weights: draw the confusion matrix here (PNG; the classes on the axes).",
)
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
    output,
    device,
    precision,
    workers,
    as_json,
):
    """Top-1/top-5 of --weights on DATA_DIR (idx test split, val/, test/ or the folder), or with
    --retrieval precision@k and mAP of DATA_DIR's images against an index (same label =
    relevant)."""
    if not weights and index_dir is not None:
        retrieval = True  # an index and no classifier: there is only one thing to evaluate
    if retrieval:
        if output is not None:
            raise click.UsageError("-o draws a classifier's confusion matrix: give --weights")
        from retrieval.evaluation.retrieval_quality import evaluate_retrieval

        with open_index(
            index_dir,
            device=device,
            batch_size=batch_size,
            workers=workers,
            precision=None if precision == "auto" else precision,  # auto: the index's own
        ) as index:
            report = evaluate_retrieval(index, data_dir, k=k, map_depth=map_depth)
            indexed = index.count
        if as_json:
            emit_json(report.to_dict())
            return
        ranking = "full ranking" if report.map_depth >= indexed else f"first {report.map_depth}"
        click.echo(
            f"{counted(report.queries, 'query', 'queries')} against "
            f"{counted(indexed, 'indexed image')}: precision@{report.k} "
            f"{report.precision_at_k:.3f}, mAP {report.mean_average_precision:.3f} ({ranking}), "
            f"{report.seconds:.1f} s"
        )
        if report.skipped_queries:
            unused = counted(report.skipped_queries, "query image")
            click.echo(f"{unused} could not be used", err=True)
        return
    if not weights:
        raise click.UsageError(
            "give --weights CHECKPOINT (top-1/top-5 of a classifier) or --retrieval [--index DIR]"
            " (precision@k and mAP against an index)"
        )
    from retrieval.evaluation.classifier import evaluate_classifier

    with stage_bars("batch") as bars:
        report = evaluate_classifier(
            weights,
            data_dir,
            device=device,
            batch_size=batch_size,
            ten_crop=ten_crop,
            precision=precision,
            workers=workers,
            progress=bars,
        )
    if output is not None:
        report.draw_confusion(output)
        click.echo(f"confusion matrix: {output}", err=True)
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"{counted(report.images, 'image')}: {_top_k(report.top1, report.top5)} (centre crop)"
    )
    if report.top1_ten_crop is not None:
        click.echo(f"ten crops: {_top_k(report.top1_ten_crop, report.top5_ten_crop)}")
    for name, accuracy in report.per_class.items():
        click.echo(f"  {report.display(name, with_id=True)}: {100 * accuracy:.1f}%")
    if report.largest_confusions:
        click.echo("most confused (true -> predicted):")
        for cell in report.largest_confusions:
            click.echo(
                f"  {cell['true']} -> {cell['predicted']}: {cell['count']} "
                f"({100 * cell['share_of_true']:.1f}% of {cell['true']})"
            )


def _top_k(top1: float, top5: float | None) -> str:
    """Top-1, and top-5 where it was measured (more than five classes)."""
    return f"top-1 {100 * top1:.2f}%" + ("" if top5 is None else f", top-5 {100 * top5:.2f}%")


@click.command("recall")
@index_option
@click.option(
    "--against",
    "exact_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="An exact (Flat) index of the same files, built with the same model.",
)
@click.option("-k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Stored vectors sampled as queries.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@with_options(search_options)
@json_option
def recall_command(index_dir, exact_dir, k, queries, seed, nprobe, ef_search, as_json):
    """recall@k, speed and size of an approximate index against an exact one."""
    from retrieval.evaluation.retrieval_quality import evaluate_recall

    with open_index(index_dir) as approximate, open_index(exact_dir) as exact:
        report = evaluate_recall(
            approximate,
            exact,
            k=k,
            queries=queries,
            seed=seed,
            nprobe=nprobe,
            ef_search=ef_search,
        )
    if as_json:
        emit_json(report.__dict__)
        return
    click.echo(f"recall@{report.k}: {report.recall_at_k:.4f} over {report.queries} queries")
    click.echo(
        f"queries/s: {report.approximate_queries_per_second:,.0f} approximate, "
        f"{report.exact_queries_per_second:,.0f} exact"
    )
    click.echo(
        f"size: {human_bytes(report.approximate_bytes)} approximate, "
        f"{human_bytes(report.exact_bytes)} exact"
    )


def register(group: click.Group) -> None:
    for command in (evaluate_command, recall_command):
        group.add_command(command)
