"""The library's front: what the CLI calls, and what a Python user imports.

from retrieval import api
report = api.index_folder("images")
for result in api.search_images(["cat.jpg"], options=api.SearchOptions(k=6)):
    print(result.to_dict())
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions
from retrieval.figures.grid import render_grid
from retrieval.images.walk import find_images
from retrieval.indexes import store
from retrieval.indexes.kinds import IndexSpec
from retrieval.indexes.store import default_index_dir
from retrieval.indexing.options import IndexOptions, IndexReport
from retrieval.indexing.run import index_folder
from retrieval.search.quality import (
    RecallReport,
    RetrievalQuality,
    evaluate_recall,
    evaluate_retrieval,
)
from retrieval.search.query import QueryResult, SearchOptions, display_path, search_images

__all__ = [
    "ExtractOptions",
    "IndexOptions",
    "IndexReport",
    "IndexSpec",
    "QueryResult",
    "RecallReport",
    "RetrievalQuality",
    "SearchOptions",
    "default_index_dir",
    "draw_grid",
    "evaluate_recall",
    "evaluate_retrieval",
    "index_folder",
    "index_info",
    "pick_queries",
    "remove_paths",
    "search_images",
]


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
    options = dataclasses.replace(options, exclude_self=True)
    results = search_images(pick_queries(queries, n, seed), index_dir, options)
    return render_grid(results, output, tile=tile), results


def index_info(index_dir: Path | None = None) -> dict[str, Any]:
    """What an index holds: counts, model, layer, dim, metric, kind, size on disk."""
    directory = Path(index_dir or default_index_dir())
    snapshot = store.open_snapshot(directory)
    try:
        manifest = snapshot.manifest
        model = manifest["model"]
        return {
            "index": display_path(os.path.abspath(directory)),
            "count": snapshot.count,
            "skipped": int(manifest.get("skipped", 0)),
            "model": model["source"],
            "weights_sha256": model["sha256"],
            "arch": model["arch"]["arch"],
            "layer": model["layer"],
            "preprocessing": model["preprocessing"],
            "dim": snapshot.dim,
            "metric": manifest["metric"],
            "index_type": manifest["index"],
            "format_version": manifest["version"],
            "generation": manifest["generation"],
            "created": manifest.get("created"),
            "updated": manifest.get("updated"),
            "size_bytes": snapshot.size_on_disk(),
        }
    finally:
        snapshot.close()


def remove_paths(paths: Sequence[Path], index_dir: Path | None = None) -> dict[str, list[str]]:
    """Drop these files (or every file under these folders) from the index."""
    from retrieval.indexing.commit import remove_from_index

    result = remove_from_index(
        [Path(os.path.abspath(p)) for p in paths], Path(index_dir or default_index_dir())
    )
    return {key: [display_path(p) for p in values] for key, values in result.items()}
