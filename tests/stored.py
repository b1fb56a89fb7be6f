"""What an index holds, read back through its FAISS file and its rows, for tests to compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.indexes import store


def stored_vectors(index_dir: Path) -> dict[str, np.ndarray]:
    """path -> stored vector; asserts the FAISS file, the rows and the manifest agree on count."""
    snapshot = store.open_snapshot(index_dir)
    try:
        index = snapshot.index
        rows = list(snapshot.iter_rows(status="indexed"))
        assert index.ntotal == len(rows) == snapshot.count
        return {row.path: index.reconstruct(row.id) for row in rows}
    finally:
        snapshot.close()


def search(index_dir: Path | None, queries: list, k: int = 6, **open_with) -> list:
    """Open the index, search these queries, close it: what a one-shot script does."""
    from retrieval import Index

    with Index.open(index_dir, **open_with) as index:
        return index.search(queries, k)
