"""fc7 out of an index, as shards other tools read (clip-retrieval's and autofaiss's layout).

Rows are read a page at a time (``Index.rows(offset, limit)``) and their vectors fetched per
page, so memory holds one page whatever the collection's size. ``npy`` writes
:mod:`retrieval.indexes.shards` (``fc7-NNNNN.npy`` float32 + ``metadata-NNNNN.parquet``, the
layout ``retrieve index --from-embeddings`` reads back); ``--float16`` halves the files for
readers that take it (autofaiss does) and is refused by ``--from-embeddings``, which wants the
exact vectors; ``parquet`` writes one table per shard with an ``embedding`` column
(fixed-size list of float32), as clip-retrieval's parquet output does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.indexes.shards import ROWS_PER_SHARD, ShardRows, ShardWriter, write_identity

if TYPE_CHECKING:
    from retrieval.search.index import Index

PAGE = 4096
FORMATS = ("npy", "parquet")


@dataclass
class ExportReport:
    folder: Path
    rows: int
    shards: int
    format: str
    dtype: str


def model_record(index: Index) -> dict[str, Any]:
    """What identity.json's ``model`` holds: the manifest's model record and identity, the pair
    ``--from-embeddings`` reads back (``build/embeddings.identity_of_shards``)."""
    return {"model": index.manifest["model"], "identity": index.manifest["identity"]}


def export(
    index: Index,
    folder: Path,
    *,
    fmt: str = "npy",
    float16: bool = False,
    rows_per_shard: int = ROWS_PER_SHARD,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write every indexed row's fc7 and metadata to ``folder`` in id order."""
    if fmt not in FORMATS:
        raise RetrieveError(f"--format must be one of {', '.join(FORMATS)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise RetrieveError(f"{folder} is not empty; export into a new folder")
    total = index.count_rows()
    dtype = np.float16 if float16 else np.float32
    if fmt == "npy" and not float16:
        writer: Any = ShardWriter(folder, model_record(index), index.dim, rows_per_shard)
    else:
        write_identity(folder, model_record(index), index.dim)
        writer = _PlainWriter(folder, fmt, dtype, rows_per_shard)
    written = 0
    with writer:
        for page in _pages(index):
            vectors = index.vectors([r.id for r in page])
            writer.add(vectors, _shard_rows(page))
            written += len(page)
            if progress:
                progress(written, total)
    shards = len(writer.written)
    return ExportReport(folder, written, shards, fmt, np.dtype(dtype).name)


def _pages(index: Index):
    offset = 0
    while True:
        page = index.rows(offset=offset, limit=PAGE)
        if not page:
            return
        yield page
        offset += len(page)


def _shard_rows(rows) -> ShardRows:
    return ShardRows(
        id=[r.id for r in rows],
        path=[r.path for r in rows],
        label=[r.label for r in rows],
        sha256=[r.sha256 for r in rows],
        size=[r.size for r in rows],
        mtime=[r.mtime_ns for r in rows],
    )


class _PlainWriter:
    """float16 ``.npy`` or parquet-with-embeddings shards, each written whole when full."""

    def __init__(self, folder: Path, fmt: str, dtype, rows_per_shard: int) -> None:
        self.folder, self.fmt, self.dtype, self.size = folder, fmt, dtype, rows_per_shard
        self.written: list[int] = []
        self._vectors: list[np.ndarray] = []
        self._rows = ShardRows()

    def add(self, vectors: np.ndarray, rows: ShardRows) -> None:
        start = 0
        while start < len(vectors):
            take = min(len(vectors) - start, self.size - len(self._rows))
            self._vectors.append(np.asarray(vectors[start : start + take], self.dtype))
            self._rows.extend(rows.cut(start, start + take))
            start += take
            if len(self._rows) >= self.size:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from retrieval.atomic import atomic_path

        number = len(self.written)
        vectors = np.concatenate(self._vectors)
        columns = {
            "id": pa.array(self._rows.id, pa.int64()),
            "path": pa.array(self._rows.path, pa.string()),
            "label": pa.array(self._rows.label, pa.string()),
            "sha256": pa.array(self._rows.sha256, pa.string()),
            "size": pa.array(self._rows.size, pa.int64()),
            "mtime": pa.array(self._rows.mtime, pa.int64()),
        }
        if self.fmt == "parquet":
            flat = pa.array(vectors.ravel(), pa.from_numpy_dtype(vectors.dtype))
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
            with atomic_path(self.folder / f"embeddings-{number:05d}.parquet") as tmp:
                pq.write_table(pa.table(columns), str(tmp))
        else:
            with atomic_path(self.folder / f"metadata-{number:05d}.parquet") as tmp:
                pq.write_table(pa.table(columns), str(tmp))
            with atomic_path(self.folder / f"fc7-{number:05d}.npy") as tmp, open(tmp, "wb") as out:
                np.save(out, vectors)
        self.written.append(number)
        self._vectors, self._rows = [], ShardRows()

    def __enter__(self) -> _PlainWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None and len(self._rows):
            self._flush()
