"""``extract``: fc7 of a collection as embedding shards, on this machine or a Ray cluster."""

from __future__ import annotations

from pathlib import Path

import click

from retrieval.units import counted

from .options import device_option, emit_json, json_option


@click.command("extract")
@click.argument("source", required=False)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for fc7-NNNNN.npy + metadata-NNNNN.parquet shards (run again to resume).",
)
@click.option(
    "--files-from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A list of image paths, one per line, instead of SOURCE.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: decode tasks and model actors on a Ray cluster.",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join: auto or HOST:PORT [default: start one on this machine].",
)
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="imagenet, random[:SEED] or a checkpoint file (the same path on every Ray node).",
)
@device_option
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 where it is native (a GPU, a CPU with AVX-512 BF16 / AMX), else fp32.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per call.")
@click.option(
    "--actors",
    type=click.IntRange(min=1),
    default=None,
    help="Ray: model actors [default: one per GPU, else one per 4 CPUs].",
)
@click.option(
    "--gpu-decode",
    is_flag=True,
    help="Ray: send JPEG bytes to the model actors and decode them there (nvjpeg on GPUs).",
)
@click.option(
    "--part-files",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Files per manifest part (the unit of resuming).",
)
@json_option
def extract_command(
    source: str | None,
    out: Path,
    files_from: Path | None,
    engine: str,
    address: str | None,
    weights: str,
    device: str,
    precision: str,
    batch_size: int | None,
    actors: int | None,
    gpu_decode: bool,
    part_files: int,
    as_json: bool,
) -> None:
    """Extract fc7 of SOURCE (a folder, a .tar shard or a glob of them) into shards in --out."""
    from retrieval.distributed import RayOptions, extract_to_shards
    from retrieval.extraction.types import ExtractOptions

    if source is None and files_from is None:
        raise click.UsageError("give SOURCE or --files-from LIST")
    ray_options = RayOptions(
        address=address,
        actors=actors,
        device=device,
        precision=precision,
        batch_size=batch_size or RayOptions.batch_size,
        part_files=part_files,
        gpu_decode=gpu_decode,
    )
    extract_options = ExtractOptions(device=device, batch_size=batch_size, precision=precision)
    report = extract_to_shards(
        source,
        out,
        weights=weights,
        engine=engine,
        files_from=files_from,
        extract=extract_options,
        ray=ray_options,
    )
    summary = {
        "out": str(report.out),
        "engine": engine,
        "parts_written": len(report.parts_written),
        "parts_done_before": report.parts_done_before,
        "images": report.images,
        "skipped": report.skipped,
        "seconds": round(report.seconds, 2),
        "model_actors": report.actors,
        "actor_work": {
            name: {"rows": w.rows, "busy_seconds": round(w.seconds, 2)}
            for name, w in sorted(report.actor_work.items())
        },
    }
    if report.actor_work:
        click.echo(report.describe_actors(), err=True)
    if as_json:
        emit_json(summary)
        return
    rate = report.images / report.seconds if report.seconds else 0.0
    click.echo(
        f"{counted(report.images, 'image')} ({rate:.1f}/s), {report.skipped} skipped, "
        f"{counted(len(report.parts_written), 'part')} written, {report.parts_done_before} "
        f"kept from an earlier run: {out}"
    )


def register(group: click.Group) -> None:
    group.add_command(extract_command)
