"""``cluster``, ``map`` and ``export``: the whole collection from its index (``duplicates`` is
in duplicates_cmds.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from retrieval.units import counted

from .options import (
    display_path,
    emit_json,
    index_option,
    json_option,
    open_index,
)
from .progress import progress_bar


@click.command("export")
@index_option
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New folder for the shards.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["npy", "parquet"]),
    default="npy",
    show_default=True,
    help="npy: fc7-NNNNN.npy + metadata-NNNNN.parquet; parquet: "
    "embeddings-NNNNN.parquet with an embedding column.",
)
@click.option("--float16", is_flag=True, help="Half-size vectors (not for --from-embeddings).")
@click.option("--rows-per-shard", type=click.IntRange(min=1), default=100_000, show_default=True)
def export_command(index_dir, output, fmt, float16, rows_per_shard):
    """Write every indexed image's fc7 and metadata as shards other tools read."""
    from retrieval.collection.export import export

    with open_index(index_dir) as ix, progress_bar("exporting", "images") as bar:
        report = export(
            ix, output, fmt=fmt, float16=float16, rows_per_shard=rows_per_shard, progress=bar
        )
    click.echo(
        f"wrote {counted(report.rows, 'vector')} ({report.dtype}) in "
        f"{counted(report.shards, 'shard')} to "
        f"{display_path(str(report.folder))}"
    )


@click.command("cluster")
@click.option(
    "-n",
    "k",
    type=click.IntRange(min=1),
    default=None,
    help="Number of clusters [default: 10, or one per image below 10].",
)
@index_option
@json_option
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for one contact sheet per cluster and outliers.png.",
)
@click.option(
    "--pca",
    "pca_dim",
    type=click.IntRange(min=2),
    default=None,
    help="Cluster a PCA copy of this many components [default: 256 when large].",
)
@click.option("--seed", type=int, default=0, show_default=True)
def cluster_command(k, index_dir, as_json, output, pca_dim, seed):
    """k-means on fc7: every image in one cluster; purity and NMI when folders are labels."""
    from retrieval.collection.clusters import cluster_index, default_cluster_count

    with open_index(index_dir) as ix:
        k = default_cluster_count(ix.count) if k is None else k
        report = cluster_index(ix, k, seed=seed, pca_dim=pca_dim)
    clustering = report.clustering
    if as_json:
        for row, c, d in zip(report.rows, clustering.assignment, clustering.distance):
            emit_json(
                {"path": row.path, "id": row.id, "cluster": int(c), "distance": round(float(d), 4)}
            )
    else:
        sizes = clustering.sizes()
        space = f"PCA-{clustering.reduced_to}" if clustering.reduced_to else "fc7"
        click.echo(
            f"{counted(len(report.rows), 'image')} in {counted(k, 'cluster')} "
            f"({space}, seed {seed}); "
            f"sizes {' '.join(str(int(n)) for n in sizes)}"
        )
        labels = [Counter() for _ in range(k)]
        for row, c in zip(report.rows, clustering.assignment):
            labels[c][row.label] += 1
        for c, count in enumerate(labels):
            common = ", ".join(f"{name} {n}" for name, n in count.most_common(3))
            click.echo(f"  cluster {c}: {counted(int(sizes[c]), 'image')} ({common})")
    if report.scores:
        click.echo(
            f"against folder labels: purity {report.scores['purity']:.3f}, "
            f"NMI {report.scores['nmi']:.3f}",
            err=as_json,
        )
    if output is not None:
        from retrieval.collection.views import cluster_sheets

        written = cluster_sheets(report, output, seed=seed)
        click.echo(
            f"wrote {counted(len(written), 'sheet')} to {display_path(str(output))}", err=True
        )


@click.command("map")
@index_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("map.png"),
    show_default=True,
)
@click.option(
    "--color",
    type=click.Choice(["label", "cluster"]),
    default="label",
    show_default=True,
    help="Frame colour: folder label, or k-means cluster.",
)
@click.option(
    "--max",
    "max_images",
    type=click.IntRange(min=2),
    default=1500,
    show_default=True,
    help="Images sampled for a larger collection.",
)
@click.option("--tile", type=click.IntRange(min=8), default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def map_command(index_dir, output, color, max_images, tile, seed):
    """A 2-D map of the collection: fc7 by PCA then t-SNE, thumbnails snapped to a grid."""
    from retrieval.collection.layout import map_layout
    from retrieval.figures.map import draw_map

    with open_index(index_dir) as ix:
        total = ix.count
        layout = map_layout(ix, max_images=max_images, color=color, seed=seed)
    shown = len(layout.rows)
    title = (f"{shown} of {total} images" if shown < total else f"{total} images") + (
        f", fc7 -> PCA -> t-SNE, coloured by {color}"
    )
    path = draw_map(
        [r.path for r in layout.rows],
        layout.cells,
        layout.groups,
        layout.side,
        output,
        tile=tile,
        title=title,
    )
    click.echo(f"wrote {display_path(str(path))} ({title})")


def register(group: click.Group) -> None:
    for command in (export_command, cluster_command, map_command):
        group.add_command(command)
