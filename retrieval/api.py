"""One-call functions over :class:`retrieval.Index`, for scripts that do one thing and exit.

Each opens the index, does its job and closes it; code that asks many questions keeps an
``Index`` open instead. Paths in results are absolute.

    from retrieval import api
    report = api.index_folder("images")
    for result in api.search_images(["cat.jpg"], options=api.SearchOptions(k=6)):
        print(result.to_dict())
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions
from retrieval.images.walk import find_images
from retrieval.index import Index
from retrieval.indexes.kinds import IndexSpec
from retrieval.indexes.store import default_index_dir
from retrieval.indexing.options import IndexOptions, IndexReport
from retrieval.search.query import QueryResult, SearchOptions

__all__ = [
    "ExtractOptions",
    "Index",
    "IndexOptions",
    "IndexReport",
    "IndexSpec",
    "QueryResult",
    "SearchOptions",
    "default_index_dir",
    "draw_grid",
    "evaluate_recall",
    "evaluate_retrieval",
    "index_embeddings",
    "index_folder",
    "index_info",
    "pick_queries",
    "remove_paths",
    "search_images",
]


def index_folder(
    images_dir: Path,
    index_dir: Path | None = None,
    options: IndexOptions = IndexOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Index every image under ``images_dir``; on an existing index, apply only the changes."""
    from retrieval.indexing.run import index_folder as run

    return run(Path(images_dir), index_dir, options, progress)


def index_embeddings(
    embeddings_dir: Path, index_dir: Path | None = None, options: IndexOptions = IndexOptions()
) -> IndexReport:
    """A new index from fc7 shards (``retrieve export`` / ``retrieve extract`` output)."""
    from retrieval.indexing.embeddings import index_from_embeddings

    return index_from_embeddings(Path(embeddings_dir), index_dir, options)


def open_index(index_dir: Path | None, options: SearchOptions = SearchOptions()) -> Index:
    return Index.open(
        index_dir, weights=options.weights, device=options.extract.device, extract=options.extract
    )


def search_images(
    queries: Sequence[Path], index_dir: Path | None = None, options: SearchOptions = SearchOptions()
) -> list[QueryResult]:
    """The ``k`` nearest indexed images of each query image, by Euclidean distance of fc7."""
    with open_index(index_dir, options) as index:
        return index.search(
            queries,
            options.k,
            nprobe=options.nprobe,
            ef_search=options.ef_search,
            exclude_self=options.exclude_self,
        )


def pick_queries(queries: Sequence[Path], n: int, seed: int) -> list[Path]:
    """Files as given; from each folder, ``n`` images picked at random (reproducibly by seed)."""
    picked: list[Path] = []
    rng = random.Random(seed)
    for query in map(Path, queries):
        if query.is_dir():
            found, _ = find_images(query)
            if not found:
                raise RetrieveError(f"no images found in {query}")
            picked.extend(sorted(rng.sample(found, min(n, len(found)))))
        else:
            picked.append(query)
    return picked


def draw_grid(
    queries: Sequence[Path],
    output: Path,
    index_dir: Path | None = None,
    *,
    n: int = 5,
    seed: int = 0,
    tile: int = 128,
    options: SearchOptions = SearchOptions(),
) -> tuple[Path, list[QueryResult]]:
    """The paper's Figure 4 for these queries (or ``n`` random images of each query folder).

    A query that is itself indexed is left out of its own row, as the paper's test images are
    not among the training images they are shown beside.
    """
    from retrieval.figures.grid import render_grid

    options = dataclasses.replace(options, exclude_self=True)
    results = search_images(pick_queries(queries, n, seed), index_dir, options)
    return render_grid(results, output, tile=tile), results


def index_info(index_dir: Path | None = None) -> dict[str, Any]:
    """What an index holds: counts, model, identity, dim, metric, kind, size on disk."""
    with Index.open(index_dir) as index:
        return index.info()


def remove_paths(paths: Sequence[Path], index_dir: Path | None = None) -> dict[str, list[str]]:
    """Drop these files (or every file under these folders) from the index."""
    with Index.open(index_dir) as index:
        return index.remove(paths)


def evaluate_retrieval(
    index_dir: Path | None,
    queries: Path | list[Path],
    *,
    k: int = 6,
    map_depth: int | None = None,
    weights: str | None = None,
    extract: ExtractOptions = ExtractOptions(),
) -> Any:
    """precision@k and mAP of labelled query images (label = parent folder) against an index."""
    from retrieval.search.quality import evaluate_retrieval as evaluate

    options = SearchOptions(weights=weights, extract=extract)
    with open_index(index_dir, options) as index:
        return evaluate(index, queries, k=k, map_depth=map_depth)


def evaluate_recall(
    approximate_dir: Path,
    exact_dir: Path,
    *,
    k: int = 10,
    queries: int = 1000,
    seed: int = 0,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> Any:
    """recall@k, speed and size of an approximate index against an exact one."""
    from retrieval.search.quality import evaluate_recall as evaluate

    with Index.open(approximate_dir) as approximate, Index.open(exact_dir) as exact:
        return evaluate(
            approximate, exact, k=k, queries=queries, seed=seed, nprobe=nprobe, ef_search=ef_search
        )
