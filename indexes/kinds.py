"""Index kinds: which FAISS index holds the fc7 rows; how it is built, trained and pruned.

Why here: the store records an :class:`IndexSpec` in its manifest and calls these functions; it
never names a FAISS class. Every kind is built from an ``index_factory`` string, so a manifest
entry rebuilds the same structure. The metric is always L2, the paper's Euclidean distance on fc7
(with ``normalize`` the ranking equals cosine). Searching a built index is ``searcher.py``'s job.

Ids: IVF kinds store int64 ids natively; every other kind is wrapped in ``IDMap2`` so that
``add_with_ids`` works and rows can be reconstructed by id. faiss 1.15 parses ``IDMap2,`` in
front of pre-transforms (``IDMap2,L2norm,PCA256,HNSW32``), so the factory string is the whole
recipe.

``CAGRA`` (``CAGRA32``: graph degree 32, the default) is cuVS's GPU graph index, offered where
faiss's cuVS build sees a GPU. Stored as faiss's ``IndexHNSWCagra``: an HNSW graph whose base
layer keeps every node's full 2M-neighbour list, built on the CPU by insertion (so rows are
added chunk by chunk and removed as HNSW's are), which ``index_cpu_to_gpu`` turns into a
``GpuIndexCagra`` for the search; on a CPU the same file is searched as HNSW. faiss's own
GPU-built CAGRA takes all vectors at once and no later additions, which an index that follows a
folder cannot use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import IndexMismatchError, RetrieveError

from .gpu import cagra_ready, unwrap
from .gpu import faiss_message as _faiss_message

__all__ = [
    "IndexSpec",
    "build_index",
    "needs_training",
    "new_index",
    "prepare_index",
    "refuse_unbuildable",
    "remove_ids",
    "training_sample_size",
]

log = logging.getLogger(__name__)

_REDUCE = re.compile(r"^PCAR?(\d+)$")
_CAGRA = re.compile(r"^CAGRA(\d*)$")
DEFAULT_CAGRA_DEGREE = 32
_TRANSFORM = re.compile(r"^(L2norm|PCAW?R?\d+|OPQ\d+(_\d+)?|RR\d+|ITQ\d*|Pad\d+)$")
# Training sample cap: 131,072 x 4096-d float32 is 2 GiB, the most we ask a caller to hold.
TRAINING_CAP = 2**17
# faiss warns below 39 points per k-means centroid; 40 is the usual rule of thumb.
POINTS_PER_CENTROID = 40
# Search defaults written into a new index (faiss's own, nprobe=1 and efSearch=16, lose recall).
DEFAULT_NPROBE_FRACTION = 1 / 32
DEFAULT_EF_SEARCH = 64
DEFAULT_REFINE_K_FACTOR = 4


@dataclass(frozen=True)
class IndexSpec:
    """What to build: a FAISS factory body, an optional PCA reduction, optional L2 normalisation.

    ``kind="auto"`` is resolved by ``auto.resolve_auto`` before building.
    """

    kind: str = "Flat"
    reduce: str | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise RetrieveError("index kind must be a non-empty FAISS factory string or 'auto'")
        if "IDMap" in self.kind:
            raise RetrieveError(f"index kind {self.kind!r}: leave out IDMap, ids are managed here")
        if self.reduce is not None and not _REDUCE.match(str(self.reduce)):
            raise RetrieveError(f"reduce must look like 'PCA256', not {self.reduce!r}")
        if not isinstance(self.normalize, bool):
            raise RetrieveError(f"normalize must be true or false, not {self.normalize!r}")
        if _CAGRA.match(self.kind.strip()) and (self.reduce or self.normalize):
            raise RetrieveError("index kind CAGRA takes neither --reduce nor --normalize")

    @property
    def reduced_dim(self) -> int | None:
        """Dimension after ``reduce`` (None without one)."""
        m = _REDUCE.match(self.reduce) if self.reduce else None
        return int(m.group(1)) if m else None

    def factory_string(self, dim: int) -> str:
        """The full ``index_factory`` string for vectors of ``dim`` dimensions."""
        if self.kind == "auto":
            raise RetrieveError("index kind 'auto' must be resolved with resolve_auto() first")
        if self.reduced_dim is not None and self.reduced_dim > dim:
            raise RetrieveError(f"cannot reduce {dim}-d vectors to {self.reduce}")
        parts = (["L2norm"] if self.normalize else []) + ([self.reduce] if self.reduce else [])
        body = ",".join([*parts, self.kind.strip()])
        return body if _has_native_ids(self.kind) else f"IDMap2,{body}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reduce": self.reduce, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexSpec:
        unknown = set(d) - {"kind", "reduce", "normalize"}
        if unknown:
            raise RetrieveError(f"unknown index spec fields: {', '.join(sorted(unknown))}")
        return cls(d.get("kind", "Flat"), d.get("reduce"), d.get("normalize", False))


def _cagra_degree(factory: str) -> int | None:
    """The graph degree when ``factory`` (``IDMap2,CAGRA32``) names a CAGRA index, else None."""
    core = factory.split(",")[-1].strip()
    match = _CAGRA.match(core)
    if match is None:
        return None
    degree = int(match.group(1) or DEFAULT_CAGRA_DEGREE)
    if degree < 8 or degree % 2:
        raise RetrieveError(f"bad index kind {core!r}: CAGRA's graph degree is an even number >= 8")
    return degree


def _cagra(dim: int, degree: int) -> Any:
    """An empty ``IDMap2`` over ``IndexHNSWCagra`` (base layer kept full, as CAGRA needs)."""
    import faiss

    refuse_unbuildable(IndexSpec(f"CAGRA{degree}"))
    core = faiss.IndexHNSWCagra(int(dim), degree // 2, faiss.METRIC_L2)
    core.base_level_only = False  # built on the CPU by insertion, all layers
    index = faiss.IndexIDMap2(core)
    index.referenced_objects = [core]
    return index


def refuse_unbuildable(spec: IndexSpec) -> None:
    """Raise, before any image is embedded, when this machine cannot build ``spec``'s kind
    (CAGRA without faiss's cuVS build and a GPU)."""
    if _CAGRA.match(spec.kind.strip()):
        why = cagra_ready()
        if why is not None:
            raise RetrieveError(f"index type CAGRA needs a GPU and faiss's cuVS build: {why}")


def _has_native_ids(kind: str) -> bool:
    """IVF indexes take int64 ids themselves; a refine stage (RFlat) on top of one does not."""
    tokens = [t.strip() for t in kind.split(",")]
    core = [t for t in tokens if not _TRANSFORM.match(t)]
    refined = any(t == "RFlat" or t.startswith("Refine(") for t in tokens)
    return bool(core) and core[0].startswith("IVF") and not refined


def _factory(dim: int, factory: str) -> Any:
    import faiss

    degree = _cagra_degree(factory)
    if degree is not None:
        return _cagra(dim, degree)

    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_L2)
    except RuntimeError as e:
        shown = factory.removeprefix("IDMap2,")  # ours, not the user's (ids are managed here)
        raise RetrieveError(f"bad index kind {shown!r}: {_faiss_message(e)}") from e


def _nodes(index: Any) -> Iterator[Any]:
    """Every index and vector transform inside ``index``, downcast, parents first.

    Why a walk: factory strings nest differently than they read; ``PCA64,IVF16,PQ8,RFlat``
    becomes Refine(PreTransform(PCA, IVFPQ), Flat), with the refine stage outermost.
    """
    import faiss

    node = faiss.downcast_index(index)
    yield node
    children: list[Any] = []
    if isinstance(node, faiss.IndexIDMap | faiss.IndexIDMap2):
        children = [node.index]
    elif isinstance(node, faiss.IndexPreTransform):
        for i in range(node.chain.size()):
            yield faiss.downcast_VectorTransform(node.chain.at(i))
        children = [node.index]
    elif isinstance(node, faiss.IndexRefine):
        children = [node.base_index, node.refine_index]
    elif isinstance(node, faiss.IndexHNSW):
        children = [node.storage]
    for child in children:
        yield from _nodes(child)


def _training_demand(index: Any) -> tuple[int, int]:
    """(minimum, recommended) number of training vectors for an untrained index.

    Every k-means needs at least as many points as centroids (IVF lists, 2**nbits PQ codes,
    OPQ's inner PQ) and 40 per centroid to be good; PCA needs a few points per input dimension.
    """
    import faiss

    sizes, floor, wanted = [], 1, 0
    for node in _nodes(index):
        if isinstance(node, faiss.IndexIVF):
            sizes.append(int(node.nlist))
        pq = getattr(node, "pq", None)
        if isinstance(pq, faiss.ProductQuantizer) and isinstance(node, faiss.Index):
            sizes.append(int(pq.ksub))
        if isinstance(node, faiss.OPQMatrix):
            sizes.append(256)
        elif isinstance(node, faiss.PCAMatrix):
            floor = max(floor, node.d_out)
            wanted = max(wanted, 4 * node.d_in, 10 * node.d_out)
    floor = max([floor, *sizes])
    wanted = max([wanted, *(POINTS_PER_CENTROID * s for s in sizes)])
    return floor, max(floor, min(wanted, TRAINING_CAP))


def needs_training(spec: IndexSpec, dim: int) -> bool:
    """True for kinds with a trained stage (IVF, PQ, SQ, PCA, OPQ); Flat, HNSW, L2norm are not."""
    return not _factory(dim, spec.factory_string(dim)).is_trained


def training_sample_size(spec: IndexSpec, dim: int) -> int:
    """How many vectors to sample for training: 40 per k-means centroid, enough for PCA, capped."""
    index = _factory(dim, spec.factory_string(dim))
    return 0 if index.is_trained else _training_demand(index)[1]


def build_index(spec: IndexSpec, dim: int, training_sample: np.ndarray | None) -> Any:
    """A new empty index that takes ``add_with_ids`` and ``remove_ids``, trained when needed."""
    return prepare_index(new_index(spec, dim), training_sample, spec.factory_string(dim))


def new_index(spec: IndexSpec, dim: int) -> Any:
    """An empty, untrained index of this kind (``prepare_index`` trains it)."""
    return _factory(dim, spec.factory_string(dim))


def prepare_index(index: Any, training_sample: np.ndarray | None, factory: str) -> Any:
    """Train ``index`` on the sample when its kind (``factory``, for messages) needs it, and
    set useful search defaults."""
    import faiss

    dim = index.d
    if not index.is_trained:
        floor, wanted = _training_demand(index)
        if training_sample is None:
            raise RetrieveError(f"{factory} needs training: pass {wanted:,} sample vectors")
        x = _as_matrix(training_sample, dim, "training sample")
        if len(x) < floor:
            raise RetrieveError(
                f"{factory} needs at least {floor:,} training vectors ({wanted:,} recommended), "
                f"got {len(x):,}; choose a smaller kind (fewer IVF lists) or Flat"
            )
        if len(x) < wanted:
            log.warning("training %s on %d vectors; %d recommended", factory, len(x), wanted)
        ivfpq = _first(index, faiss.IndexIVFPQ)
        if ivfpq is not None:
            # On by default: minutes of simulated annealing for codes we never search by Hamming.
            ivfpq.do_polysemous_training = False
        try:
            index.train(x)
        except RuntimeError as e:
            raise RetrieveError(f"training {factory} failed: {_faiss_message(e)}") from e
    for node in _nodes(index):
        if isinstance(node, faiss.IndexIVF):
            node.nprobe = max(1, round(node.nlist * DEFAULT_NPROBE_FRACTION))
        elif isinstance(node, faiss.IndexHNSW):
            node.hnsw.efSearch = DEFAULT_EF_SEARCH
        elif isinstance(node, faiss.IndexRefine):
            # faiss's default of 1 re-ranks only the k candidates it would return anyway.
            node.k_factor = DEFAULT_REFINE_K_FACTOR
    return index


def _first(index: Any, cls: Any) -> Any:
    """The first node of class ``cls`` inside ``index`` (see _nodes), or None."""
    return next((n for n in _nodes(index) if isinstance(n, cls)), None)


def remove_ids(index: Any, ids: np.ndarray) -> Any:
    """Remove rows by id; kinds that cannot (HNSW, RFlat) are rebuilt from their stored vectors.

    The rebuild reconstructs the core's vectors in the transformed space (exact for HNSW's flat
    storage and RFlat's refine vectors) and re-adds them with their ids, so nothing is re-trained
    or re-projected. It costs a full HNSW build: remove in batches. Returns the index to use.
    """
    import faiss

    ids = np.ascontiguousarray(ids, dtype=np.int64).ravel()
    if ids.size == 0 or index.ntotal == 0:
        return index
    try:
        index.remove_ids(ids)
        return index
    except RuntimeError as e:
        if "not implemented" not in str(e):
            raise RetrieveError(f"cannot remove ids: {_faiss_message(e)}") from e
    idmap, pre, core = unwrap(index)
    if idmap is None:
        raise RetrieveError("this index kind can neither remove rows nor be rebuilt by id")
    all_ids = faiss.vector_to_array(idmap.id_map)
    keep = ~np.isin(all_ids, ids)
    if keep.all():
        return index
    vectors = core.reconstruct_n(0, core.ntotal)[keep]
    core.reset()
    core.add(vectors)
    faiss.copy_array_to_vector(all_ids[keep], idmap.id_map)
    for wrapper in (idmap, pre):
        if wrapper is not None:
            wrapper.ntotal = core.ntotal
    if isinstance(idmap, faiss.IndexIDMap2):
        idmap.construct_rev_map()
    log.info("rebuilt index without %d rows (its kind cannot remove in place)", int((~keep).sum()))
    return index


def _as_matrix(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise IndexMismatchError(f"{what} have shape {a.shape}, the index holds {dim}-d vectors")
    return np.ascontiguousarray(a, dtype=np.float32)
