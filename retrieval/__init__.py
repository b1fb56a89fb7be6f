"""retrieve: image retrieval by AlexNet fc7 features and FAISS, after Krizhevsky et al. (2012).

The public API: :class:`Index` (an index kept open: search, neighbours, rows, update, remove)
and the option and result types it takes and gives. Importing it loads neither torch nor a
model; the first image to embed does.
"""

from __future__ import annotations

from retrieval.build.options import IndexOptions, IndexReport
from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions
from retrieval.indexes.kinds import IndexSpec
from retrieval.model.identity import Identity
from retrieval.results import Neighbor, QueryResult
from retrieval.search.index import Index
from retrieval.version import __version__

__all__ = [
    "ExtractOptions",
    "Identity",
    "Index",
    "IndexOptions",
    "IndexReport",
    "IndexSpec",
    "Neighbor",
    "QueryResult",
    "RetrieveError",
    "__version__",
]
