"""Write and read an exact (``IDMap2,Flat``) index file a block of vectors at a time.

A Flat index is every vector, 16 KiB per fc7 row: building it in RAM in order to write it makes
the memory of ``retrieve index`` grow with the collection. faiss writes only an index it holds
whole, so this module writes the very bytes ``faiss.write_index`` writes for an
``IndexIDMap2(IndexFlatL2)``: the two headers, the vectors as they come, the ids, and then the
counts patched in. :func:`layout_matches_faiss` checks that against the installed faiss (the
bytes must be identical); where it does not hold, callers build the index in RAM as before.
The files are ordinary faiss files: ``faiss.read_index`` reads them.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

# fourcc, d, ntotal, two unused fields faiss fills with 2**20, is_trained, metric_type (1 = L2).
_HEADER = struct.Struct("<4siqqq?i")
_COUNT = struct.Struct("<Q")
_UNUSED = 1 << 20
_METRIC_L2 = 1
_IDMAP2, _FLAT_L2 = b"IxM2", b"IxF2"
_CODES_SIZE_AT = 2 * _HEADER.size  # uint64: the number of float32 values that follow
_VECTORS_AT = _CODES_SIZE_AT + _COUNT.size
_NTOTAL_AT = (4 + 4, _HEADER.size + 4 + 4)  # ntotal in the IDMap2 header and in the Flat one
FLAT_FACTORY = "IDMap2,Flat"


class FlatIndexWriter:
    """Streams ``add_with_ids`` blocks into an ``IDMap2,Flat`` faiss file; ids stay in RAM
    (8 bytes a row) until :meth:`finish` appends them and patches the counts."""

    def __init__(self, handle: BinaryIO, dim: int) -> None:
        self._handle = handle
        self.d = int(dim)
        self.ntotal = 0
        self._ids: list[np.ndarray] = []
        for fourcc in (_IDMAP2, _FLAT_L2):
            handle.write(_HEADER.pack(fourcc, self.d, 0, _UNUSED, _UNUSED, True, _METRIC_L2))
        handle.write(_COUNT.pack(0))

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        ids = np.ascontiguousarray(ids, dtype="<i8").ravel()
        if vectors.ndim != 2 or vectors.shape[1] != self.d or len(vectors) != len(ids):
            raise ValueError(f"expected {len(ids)} x {self.d} vectors, got {vectors.shape}")
        self._handle.write(memoryview(vectors).cast("B"))
        self._ids.append(ids)
        self.ntotal += len(ids)

    def finish(self) -> None:
        """Append the ids and write the counts into the headers; the caller closes the file."""
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, "<i8")
        self._handle.write(_COUNT.pack(len(ids)))
        self._handle.write(memoryview(ids).cast("B"))
        end = self._handle.tell()
        for offset in _NTOTAL_AT:
            self._handle.seek(offset)
            self._handle.write(struct.pack("<q", self.ntotal))
        self._handle.seek(_CODES_SIZE_AT)
        self._handle.write(_COUNT.pack(self.ntotal * self.d))
        self._handle.seek(end)
        self._handle.flush()


class FlatLayoutError(ValueError):
    """The file is not an ``IDMap2,Flat`` index in the layout this module reads."""


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise FlatLayoutError(f"file ends early: {len(data)} of {size} bytes at offset {offset}")
    return data


def _headers(fd: int) -> tuple[tuple, tuple]:
    """The IDMap2 header and the one of the index inside it, unpacked."""
    data = _pread(fd, 2 * _HEADER.size, 0)
    return _HEADER.unpack_from(data, 0), _HEADER.unpack_from(data, _HEADER.size)


def _is_flat(outer: tuple, inner: tuple) -> bool:
    return outer[0] == _IDMAP2 and inner[0] == _FLAT_L2 and outer[-1] == _METRIC_L2


def flat_shape(handle: BinaryIO) -> tuple[int, int] | None:
    """``(dim, ntotal)`` when the file is an ``IDMap2,Flat`` index, else None."""
    try:
        outer, inner = _headers(handle.fileno())
    except FlatLayoutError:
        return None
    return (inner[1], inner[2]) if _is_flat(outer, inner) else None


@dataclass(frozen=True)
class FlatLayout:
    """Where an ``IDMap2,Flat`` file keeps its vectors and ids (byte offsets), and its shape."""

    dim: int
    ntotal: int
    vectors_at: int
    ids_at: int


def flat_layout(handle: BinaryIO) -> FlatLayout:
    """The checked layout of an ``IDMap2,Flat`` file; FlatLayoutError if it is not one."""
    fd = handle.fileno()
    outer, inner = _headers(fd)
    if not _is_flat(outer, inner):
        raise FlatLayoutError(f"not an {FLAT_FACTORY} index")
    dim, ntotal = inner[1], inner[2]
    (n_values,) = _COUNT.unpack(_pread(fd, _COUNT.size, _CODES_SIZE_AT))
    if outer[1:3] != (dim, ntotal) or n_values != ntotal * dim:
        raise FlatLayoutError(f"inconsistent {FLAT_FACTORY} header")
    ids_count_at = _VECTORS_AT + 4 * n_values
    (n_ids,) = _COUNT.unpack(_pread(fd, _COUNT.size, ids_count_at))
    if n_ids != ntotal:
        raise FlatLayoutError(f"{n_ids} ids for {ntotal} vectors")
    ids_at = ids_count_at + _COUNT.size
    if os.fstat(fd).st_size < ids_at + 8 * ntotal:
        raise FlatLayoutError("file ends before its ids")
    return FlatLayout(dim, ntotal, _VECTORS_AT, ids_at)


def read_flat_blocks(handle: BinaryIO, rows: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(vectors, ids)`` blocks of an ``IDMap2,Flat`` file, read with ``pread``: the handle's
    position is left alone, so a snapshot's open file can be shared."""
    fd = handle.fileno()
    layout = flat_layout(handle)
    dim, ntotal = layout.dim, layout.ntotal
    ids = np.frombuffer(_pread(fd, 8 * ntotal, layout.ids_at), dtype="<i8")
    row_bytes = 4 * dim
    for start in range(0, ntotal, rows):
        stop = min(start + rows, ntotal)
        data = _pread(fd, (stop - start) * row_bytes, layout.vectors_at + start * row_bytes)
        yield np.frombuffer(data, dtype="<f4").reshape(stop - start, dim), ids[start:stop]


@functools.cache
def layout_matches_faiss() -> bool:
    """Whether :class:`FlatIndexWriter` writes byte for byte what the installed faiss does."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 5)).astype(np.float32)
    ids = np.array([7, 3, 11], dtype=np.int64)
    reference = faiss.IndexIDMap2(faiss.IndexFlatL2(5))
    reference.add_with_ids(vectors, ids)
    expected = faiss.serialize_index(reference).tobytes()
    buffer = io.BytesIO()
    writer = FlatIndexWriter(buffer, 5)
    writer.add_with_ids(vectors[:2], ids[:2])
    writer.add_with_ids(vectors[2:], ids[2:])
    writer.finish()
    return buffer.getvalue() == expected
