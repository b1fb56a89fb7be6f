"""``index``, ``query``, ``grid``, ``info`` and ``remove``: one short function each."""

from __future__ import annotations

from pathlib import Path

import click

from .main import DEFAULT_K, device_option, emit_json, index_option, json_option
from .progress import progress_bar

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


def _with(options):
    def wrap(function):
        for option in reversed(options):
            function = option(function)
        return function

    return wrap


@click.command("index")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    help="CPU: decoder processes [default: one per 8 cores, at least one]; "
    "CUDA: reader threads [default: two per core].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads for the model on the CPU [default: the cores the workers leave].",
)
@click.option(
    "--index-type",
    default=None,
    help="FAISS index_factory kind: Flat, IVF1024,Flat, IVF1024,PQ64, HNSW32, ... or "
    "auto [default: the index's own kind; Flat for a new index].",
)
@click.option("--reduce", default=None, help="Compress fc7 first, e.g. PCA256.")
@click.option("--normalize", is_flag=True, help="L2-normalise fc7 (cosine ranking).")
@click.option("--memory", default=None, help="Memory budget for --index-type auto, e.g. 4GB.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: faster on GPUs and on CPUs with AVX-512 BF16 or AMX; fc7 changes slightly "
    "(the top-6 neighbours stay the same, see bench/README.md).",
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
@json_option
def index_command(
    images_dir,
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
    as_json,
):
    """Index the images under IMAGES_DIR (again: only what changed)."""
    from retrieval import api
    from retrieval.images import DEFAULT_MAX_MEGAPIXELS

    from .units import parse_bytes

    if max_megapixels:
        # Pillow refuses images over twice MAX_IMAGE_PIXELS on its own; the user's limit rules.
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, int(max_megapixels * 1e6))

    extract = api.ExtractOptions(
        device=device,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        precision=precision,
        max_megapixels=max_megapixels or DEFAULT_MAX_MEGAPIXELS,
        compile=compile_model,
    )
    options = api.IndexOptions(
        weights=weights,
        spec=_spec(api.IndexSpec, index_type, reduce, normalize),
        memory_budget=parse_bytes(memory),
        rebuild=rebuild,
        strict=strict,
        extract=extract,
        chunk_size=chunk_size,
    )
    with progress_bar("indexing", unit="img") as update:
        report = api.index_folder(images_dir, index_dir, options, progress=update)
    if as_json:
        emit_json(report.__dict__)
        return
    click.echo(report.summary())
    if report.index_kind_reason:
        click.echo(f"index type: {report.index_kind_reason}", err=True)
    if click.get_current_context().find_root().params.get("verbose") and report.times:
        click.echo(_stage_line(report.times), err=True)


def _spec(spec_class, index_type, reduce, normalize):
    if index_type is None and reduce is None and not normalize:
        return None
    return spec_class(kind=index_type or "Flat", reduce=reduce, normalize=normalize)


def _stage_line(times: dict) -> str:
    rate = times["images"] / times["wall"] if times.get("wall") else 0.0
    stages = ", ".join(
        f"{k} {times[k]:.1f}s" for k in ("read", "decode", "preprocess", "model", "write")
    )
    return f"stage busy times: {stages}; {times['images']} images at {rate:.1f} images/s"


@click.command("query")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@k_option
@index_option
@weights_option
@device_option
@_with(search_options)
@json_option
def query_command(images, k, index_dir, weights, device, nprobe, ef_search, as_json):
    """List the K nearest indexed images of each query image (files or folders)."""
    from retrieval import api

    options = api.SearchOptions(
        k=k,
        weights=weights,
        nprobe=nprobe,
        ef_search=ef_search,
        extract=api.ExtractOptions(device=device),
    )
    results = api.search_images(images, index_dir, options)
    for result in results:
        if as_json:
            emit_json(result.to_dict())
        elif result.error:
            click.echo(f"{result.query}: cannot use this image: {result.error}", err=True)
        else:
            click.echo(result.query)
            for n in result.neighbors:
                click.echo(f"  {n.rank:>3}  {n.distance:10.4f}  {n.path}  [{n.label}]")
    failed = [r for r in results if r.error]
    if failed and len(failed) == len(results):
        raise click.ClickException(f"no query image could be used ({failed[0].error})")


@click.command("grid")
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("grid.png"),
    show_default=True,
)
@k_option
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Images picked at random from each query folder.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tile", type=click.IntRange(min=32), default=128, show_default=True)
@index_option
@weights_option
@device_option
@_with(search_options)
def grid_command(queries, output, k, n, seed, tile, index_dir, weights, device, nprobe, ef_search):
    """Draw the paper's Figure 4: each query beside its K nearest images."""
    from retrieval import api

    options = api.SearchOptions(
        k=k,
        weights=weights,
        nprobe=nprobe,
        ef_search=ef_search,
        extract=api.ExtractOptions(device=device),
    )
    path, results = api.draw_grid(
        queries, output, index_dir, n=n, seed=seed, tile=tile, options=options
    )
    for result in results:
        if result.error:
            click.echo(f"{result.query}: cannot use this image: {result.error}", err=True)
    click.echo(f"wrote {path} ({sum(1 for r in results if r.neighbors)} queries x {k} neighbours)")


@click.command("info")
@index_option
@json_option
def info_command(index_dir, as_json):
    """Say what an index holds."""
    from retrieval import api

    info = api.index_info(index_dir)
    if as_json:
        emit_json(info)
        return
    kind = info["index_type"]
    extras = "".join(
        [
            f", reduce {kind['reduce']}" if kind.get("reduce") else "",
            ", L2-normalised" if kind.get("normalize") else "",
        ]
    )
    prep = info["preprocessing"]
    lines = [
        ("index", info["index"]),
        ("images", f"{info['count']} indexed, {info['skipped']} skipped"),
        (
            "model",
            f"{info['model']} (AlexNet {info['arch']}, sha256 {info['weights_sha256'][:12]})",
        ),
        ("layer", f"{info['layer']}, {info['dim']}-d, {info['metric']} distance"),
        (
            "preprocess",
            f"resize {prep['resize']}, crop {prep['crop']}, {prep['channels']} channels",
        ),
        ("index type", f"{kind['kind']}{extras}"),
        ("on disk", _human_bytes(info["size_bytes"])),
        ("updated", info["updated"]),
    ]
    for name, value in lines:
        click.echo(f"{name:<11} {value}")


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size:.1f} TB"


@click.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option
@json_option
def remove_command(paths, index_dir, as_json):
    """Remove files (or everything under folders) from the index."""
    from retrieval import api

    result = api.remove_paths(paths, index_dir)
    if as_json:
        emit_json(result)
        return
    click.echo(f"removed {len(result['removed'])} images")
    for path in result["not_in_index"]:
        click.echo(f"not in the index: {path}", err=True)


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
@_with(search_options)
@json_option
def recall_command(index_dir, exact_dir, k, queries, seed, nprobe, ef_search, as_json):
    """recall@k, speed and size of an approximate index against an exact one."""
    from retrieval import api

    report = api.evaluate_recall(
        index_dir or api.default_index_dir(),
        exact_dir,
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
        f"size: {_human_bytes(report.approximate_bytes)} approximate, "
        f"{_human_bytes(report.exact_bytes)} exact"
    )


def register(group: click.Group) -> None:
    commands = (
        index_command,
        query_command,
        grid_command,
        info_command,
        remove_command,
        recall_command,
    )
    for command in commands:
        group.add_command(command)
