"""Write an exact (``IDMap2,Flat``) index file a block of vectors at a time.

A Flat index is every vector, 16 KiB per fc7 row: building it in RAM in order to write it makes
the memory of ``retrieve index`` grow with the collection. faiss writes only an index it holds
whole, so this module writes the very bytes ``faiss.write_index`` writes for an
``IndexIDMap2(IndexFlatL2)``: the two headers, the vectors as they come, the ids, and then the
counts patched in. :func:`layout_matches_faiss` checks that against the installed faiss (the
bytes must be identical); where it does not hold, callers build the index in RAM as before.
The files are ordinary faiss files: readers open them with ``faiss.read_index`` (memory-mapped,
see ``store.Snapshot.search_index``), so only the writer knows the layout.
"""

from __future__ import annotations

import functools
import io
import struct
from typing import BinaryIO

import numpy as np

# fourcc, d, ntotal, two unused fields faiss fills with 2**20, is_trained, metric_type (1 = L2).
_HEADER = struct.Struct("<4siqqq?i")
_COUNT = struct.Struct("<Q")
_UNUSED = 1 << 20
_METRIC_L2 = 1
_IDMAP2, _FLAT_L2 = b"IxM2", b"IxF2"
_CODES_SIZE_AT = 2 * _HEADER.size  # uint64: the number of float32 values that follow
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
        if not len(ids):  # a carried-over block whose rows were all removed
            return
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
