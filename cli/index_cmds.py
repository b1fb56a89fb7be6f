"""``index``, ``info`` and ``remove``: build or update an index, describe it, drop rows from it."""

from __future__ import annotations

from pathlib import Path

import click

from retrieval.devices import usable_cores
from retrieval.units import counted, human_bytes, parse_bytes

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


@click.command("index")
@click.argument(
    "images_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--from-embeddings",
    "embeddings_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Build the index from fc7 shards (retrieve export / retrieve extract) instead of images.",
)
@index_option
@weights_option
@device_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per model call [default: 64 on the CPU, 256 on a GPU].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="CPU: decoder processes [default: from what a few of the files take to decode: at "
    "least two, up to one past the cores]; CUDA: reader threads [default: two per core].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads for the model on the CPU [default: one per core].",
)
@click.option(
    "--index-type",
    default=None,
    help="FAISS index_factory kind: Flat, IVF1024,Flat, IVF1024,PQ64, HNSW32, ... or "
    "auto; CAGRA where faiss's cuVS build sees a GPU "
    "[default: the index's own kind; Flat for a new index].",
)
@click.option("--reduce", default=None, help="Compress fc7 first, e.g. PCA256.")
@click.option("--normalize", is_flag=True, help="L2-normalise fc7 (cosine ranking).")
@click.option("--memory", default=None, help="Memory budget for --index-type auto, e.g. 4GB.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default=None,
    help="Recorded in the index. auto: bf16 where it is native (GPUs, CPUs with AVX-512 BF16 "
    "or AMX: 1.5x faster, 0.997 of top-6 lists unchanged), fp32 elsewhere "
    "[default: the index's own; auto for a new index].",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the model: faster on a GPU after a warm-up of tens of seconds.",
)
@click.option(
    "--max-megapixels",
    type=click.FloatRange(min=0.01),
    default=None,
    help="Skip images larger than this (decompression bombs).",
)
@click.option("--rebuild", is_flag=True, help="Start the index afresh instead of updating it.")
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Files per saved chunk: a killed run resumes after the last whole chunk.",
)
@click.option("--strict", is_flag=True, help="Stop at the first file that cannot be indexed.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: the files to embed go to a Ray cluster (pip install 'retrieve[ray]').",
)
@click.option(
    "--address",
    default=None,
    help="With --engine ray: auto or HOST:PORT [default: start a cluster on this machine].",
)
@click.option(
    "--signatures/--no-signatures",
    default=True,
    show_default=True,
    help="Also sign each new image for `retrieve duplicates` (hashes and a 32 px thumbnail, "
    "kept by content beside the index), from the decode the model gets.",
)
@json_option
def index_command(
    images_dir,
    embeddings_dir,
    index_dir,
    weights,
    device,
    batch_size,
    workers,
    threads,
    index_type,
    reduce,
    normalize,
    memory,
    precision,
    compile_model,
    max_megapixels,
    rebuild,
    chunk_size,
    strict,
    engine,
    address,
    signatures,
    as_json,
):
    """Index the images under IMAGES_DIR (again: only what changed), or build an index from
    --from-embeddings shards."""
    if (images_dir is None) == (embeddings_dir is None):
        raise click.UsageError("give IMAGES_DIR or --from-embeddings DIR (one of them)")
    from retrieval import ExtractOptions, Index, IndexOptions, IndexSpec
    from retrieval.images.decode import DEFAULT_MAX_MEGAPIXELS

    extract = ExtractOptions(
        device=device,
        batch_size=batch_size,
        workers=workers,
        threads=threads or usable_cores(),
        precision=precision,
        max_megapixels=max_megapixels or DEFAULT_MAX_MEGAPIXELS,
        compile=compile_model,
    )
    options = IndexOptions(
        weights=weights,
        spec=_spec(IndexSpec, index_type, reduce, normalize),
        memory_budget=_memory_budget(memory),
        rebuild=rebuild,
        strict=strict,
        extract=extract,
        chunk_size=chunk_size,
        engine=engine,
        ray_address=address,
        signatures=signatures,
    )
    if embeddings_dir is not None:
        index = Index.create(index_dir, embeddings_dir, options, embeddings=True)
    else:
        with progress_bar("indexing", unit="img") as update:
            index = Index.create(index_dir, images_dir, options, progress=update)
    report = index.report
    if signatures and embeddings_dir is None:
        # The GPU and Ray roads sign nothing as they decode, and older rows may lack one.
        from retrieval.duplicates.signatures import sign_index

        with progress_bar("signing", unit="img") as update:
            report.signed += sign_index(index, update)
    index.close()
    if as_json:
        emit_json(report.__dict__)
        return
    click.echo(report.summary())
    if report.index_kind_reason:
        click.echo(f"index type: {report.index_kind_reason}", err=True)
    if click.get_current_context().find_root().params.get("verbose") and report.times:
        click.echo(_stage_line(report.times), err=True)


def _agreement(info: dict) -> str:
    measured = info.get("fp32_agreement")
    if not measured:
        return ""
    return f" (fp32 queries: top-6 overlap {measured['top6_overlap']:.3f} on {measured['queries']})"


def _memory_budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--memory") from None


def _spec(spec_class, index_type, reduce, normalize):
    if index_type is None and reduce is None and not normalize:
        return None
    return spec_class(kind=index_type or "Flat", reduce=reduce, normalize=normalize)


def _stage_line(times: dict) -> str:
    if times.get("engine") == "ray":
        return (
            f"stage busy times: not measured (the Ray cluster's workers read, decoded and "
            f"embedded the files); the whole run took {times['wall']:.1f}s"
        )
    rate = times["images"] / times["wall"] if times.get("wall") else 0.0
    stages = ", ".join(
        f"{k} {times[k]:.1f}s" for k in ("read", "decode", "sign", "preprocess", "model", "write")
    )
    line = f"stage busy times: {stages}; {times['images']} images at {rate:.1f} images/s"
    if times.get("gpu_decoded") or times.get("gpu_fallback"):
        line += (
            f"; decoded {times['gpu_decoded']} on the GPU, {times['cpu_decoded']} on the CPU, "
            f"{times['gpu_fallback']} on the CPU after the GPU failed"
        )
    return line


@click.command("info")
@index_option
@json_option
def info_command(index_dir, as_json):
    """Say what an index holds."""
    with open_index(index_dir) as index:
        info = index.info()
    if as_json:
        emit_json(info)
        return
    assumed = f" ({', '.join(info['assumed'])} assumed: not recorded by format 1)"
    kind = info["index_type"]
    extras = "".join(
        [
            f", reduce {kind['reduce']}" if kind.get("reduce") else "",
            ", L2-normalised" if kind.get("normalize") else "",
        ]
    )
    prep = info["preprocessing"]
    lines = [
        ("index", display_path(info["index"])),
        ("images", f"{info['count']} indexed, {info['skipped']} skipped"),
        (
            "model",
            f"{info['model']} (AlexNet {info['arch']}, sha256 {info['weights_sha256'][:12]})",
        ),
        *_started_from(info),
        ("layer", f"{info['layer']}, {info['dim']}-d, {info['metric']} distance"),
        ("precision", info["precision"] + (assumed if info["assumed"] else "") + _agreement(info)),
        (
            "preprocess",
            f"resize {prep['resize']}, crop {prep['crop']}, {prep['channels']} channels",
        ),
        ("index type", f"{kind['kind']}{extras}"),
        ("on disk", human_bytes(info["size_bytes"])),
        ("updated", info["updated"]),
    ]
    for name, value in lines:
        click.echo(f"{name:<11} {value}")


def _started_from(info: dict) -> list[tuple[str, str]]:
    start = info.get("started_from")
    if not start:
        return []
    classes = f", {start['num_classes']} classes" if start.get("num_classes") else ""
    return [("fine-tuned", f"from {start['source']} (sha256 {start['sha256'][:12]}{classes})")]


@click.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@json_option
def remove_command(paths, index_dir, as_json):
    """Remove files (or everything under folders) from the index."""
    with open_index(index_dir) as index:
        result = index.remove(paths)
    if as_json:
        emit_json(result)
    else:
        shown = {key: [display_path(p) for p in values] for key, values in result.items()}
        click.echo(f"removed {counted(len(shown['removed']), 'image')}")
        for path in shown["not_in_index"]:
            click.echo(f"not in the index: {path}", err=True)
    if result["not_in_index"]:  # as rm does for a name it cannot find: the rest is done
        raise click.exceptions.Exit(1)


def register(group: click.Group) -> None:
    for command in (index_command, info_command, remove_command):
        group.add_command(command)
