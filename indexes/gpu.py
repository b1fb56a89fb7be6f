"""Search on a GPU: a faiss index moved to the faiss GPU build, or the exact Flat rows held by
torch on a CUDA device; plus the small faiss plumbing (unwrapping IDMap / PreTransform) they need.

Why a separate module: the GPU paths are optional extras with their own failure modes (no CUDA,
a faiss build without GPUs, an index kind the GPU cannot hold). ``searcher.Searcher`` decides
where a snapshot's searches run and calls these. torch is imported only inside functions, so
importing ``retrieval.indexes`` never pays for it.

:class:`TorchExactSearcher` is exact L2 search written as ``||q||^2 + ||x||^2 - 2 q.x``: one
matmul per (query batch, database chunk), a top-k per chunk and a merge of the running best k
across chunks (``exact.nearest``, the same scan the CPU search runs), so GPU memory for
distances stays bounded whatever the database size. It runs on any torch device, which is how
the tests cover its logic on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError

from .exact import nearest

# Elements in one (query batch x database chunk) distance matrix: 2**27 fp32 = 512 MiB.
_DISTANCE_ELEMENTS = 2**27
# faiss GPU indexes answer at most this many neighbours per query.
FAISS_GPU_MAX_K = 2048

_gpu_resources: Any = None


def faiss_gpu_count() -> int:
    """GPUs visible to faiss: 0 with the faiss-cpu build, whose module has no GPU symbols."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    if get is None or not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(get())
    except RuntimeError:
        return 0


def cagra_ready() -> str | None:
    """None when faiss can search a CAGRA graph here (its cuVS build and a GPU), else why not."""
    import faiss

    if "CUVS" not in faiss.get_compile_options() or not hasattr(faiss, "IndexHNSWCagra"):
        return (
            "this faiss is not the GPU build with cuVS (pip install 'retrieve[gpu]', "
            "faiss-gpu-cuvs)"
        )
    if faiss_gpu_count() == 0:
        return "faiss sees no GPU here"
    return None


def torch_cuda_count() -> int:
    """CUDA devices torch sees: 0 without one, or without torch (optional for ``indexes``)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def torch_cuda_available() -> bool:
    """True when torch imports and sees a CUDA device."""
    return torch_cuda_count() > 0


# faiss GPU IVF-PQ keeps a query's lookup tables in shared memory: past 48 bytes a code
# (sub-quantizers x bits / 8), they only fit in float16.
GPU_PQ_FLOAT32_MAX_BYTES = 48


def gpu_cloner_options(index: Any) -> Any:
    """Cloner options that let ``index`` move: float16 lookup tables for IVF-PQ codes > 48 B."""
    import faiss

    options = faiss.GpuClonerOptions()
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF kind
        return options
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.code_size > GPU_PQ_FLOAT32_MAX_BYTES:
        options.useFloat16 = True  # for IVF-PQ: the lookup tables (the codes are unchanged)
    return options


def without_fast_scan(index: Any) -> Any:
    """``index`` with an IVF-PQ fast-scan core rewritten as plain IVF-PQ over the same codes.

    faiss has no GPU version of the fast-scan kinds (``IVF...,PQ...x4fs``, what ``auto`` picks
    for large collections), so they never moved; the plain IVF-PQ with the same coarse
    quantizer, product quantizer and codes moves, and ranks as the fast-scan does up to its
    8-bit quantised lookup tables. Any other index comes back as it is.
    """
    import faiss

    node = faiss.downcast_index(index)
    pre = None
    if isinstance(node, faiss.IndexPreTransform):
        pre, node = node, faiss.downcast_index(node.index)
    if not isinstance(node, faiss.IndexIVFPQFastScan):
        return index
    plain = faiss.IndexIVFPQ(
        node.quantizer, node.d, node.nlist, node.pq.M, node.pq.nbits, node.metric_type
    )
    plain.pq = node.pq
    plain.by_residual = node.by_residual
    plain.nprobe = node.nprobe
    plain.is_trained = True
    packer = node.get_CodePacker()
    lists = node.invlists
    for list_no in range(node.nlist):
        size = lists.list_size(list_no)
        if size == 0:
            continue
        blocks = -(-size // packer.nvec)
        packed = faiss.rev_swig_ptr(lists.get_codes(list_no), blocks * packer.block_size)
        codes = np.empty((blocks * packer.nvec, packer.code_size), dtype=np.uint8)
        for block in range(blocks):
            start = block * packer.block_size
            packer.unpack_all(
                faiss.swig_ptr(packed[start : start + packer.block_size]),
                faiss.swig_ptr(codes[block * packer.nvec :]),
            )
        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size).copy()
        codes = np.ascontiguousarray(codes[:size])
        plain.invlists.add_entries(list_no, size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    plain.ntotal = node.ntotal
    plain.referenced_objects = [index]  # the quantizer and pq belong to the original
    if pre is None:
        return plain
    wrapped = faiss.IndexPreTransform(plain)
    for i in reversed(range(pre.chain.size())):
        wrapped.prepend_transform(pre.chain.at(i))
    wrapped.referenced_objects = [index, plain]
    return wrapped


def faiss_index_to_gpu(index: Any, device: int = 0) -> Any:
    """A GPU copy of ``index`` (search parameters included); raises RuntimeError if unsupported.

    Fast-scan kinds are rewritten as plain IVF-PQ first and IVF-PQ with codes over 48 bytes
    moves with float16 lookup tables (:func:`without_fast_scan`, :func:`gpu_cloner_options`).
    """
    import faiss

    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    portable = without_fast_scan(index)
    return faiss.index_cpu_to_gpu(_gpu_resources, device, portable, gpu_cloner_options(portable))


def unwrap(index: Any) -> tuple[Any, Any, Any]:
    """(IDMap or None, IndexPreTransform or None, core index), each downcast to its real class.

    Why: faiss hands back base-class proxies; attributes such as ``nlist`` or ``hnsw`` only exist
    on the downcast object. The parents keep ownership, so the children stay valid while
    ``index`` lives.
    """
    import faiss

    node = faiss.downcast_index(index)
    idmap = pre = None
    if isinstance(node, faiss.IndexIDMap2 | faiss.IndexIDMap):
        idmap, node = node, faiss.downcast_index(node.index)
    if isinstance(node, faiss.IndexPreTransform):
        pre, node = node, faiss.downcast_index(node.index)
    return idmap, pre, node


class TorchExactSearcher:
    """Exact L2 k-NN over a fixed database held on a torch device.

    Build it once and call :meth:`search` many times: the database stays resident (as
    ``searcher.Searcher`` keeps it for a snapshot on ``cuda:N``).
    ``precision="float16"`` halves memory and uses tensor cores: vectors are divided by the
    largest norm before the cast so that dot products cannot overflow fp16, norms stay fp32, and
    the products accumulate in and come back as fp32 (``exact.inner_products``), so the ranking is
    exact up to the fp16 rounding of the stored vectors. ``"auto"`` keeps fp32 when it fits in
    free GPU memory, else fp16.
    """

    def __init__(
        self,
        database: Any,  # N x D: a NumPy array, or a torch tensor on any device
        *,
        device: str = "cuda",
        precision: str = "auto",
        chunk_rows: int | None = None,
    ) -> None:
        import torch

        if database.ndim != 2:
            raise RetrieveError(f"database must be 2-d, got shape {database.shape}")
        self.device = torch.device(device)
        self.precision = _choose_precision(precision, database, self.device)
        self.ntotal, self.dim = database.shape
        self.chunk_rows = chunk_rows
        # Upload in slices so the host never holds a second full copy (1 M x 4096 is 16 GB).
        half = self.precision == "float16"
        dtype = torch.float16 if half else torch.float32
        self._db = torch.empty((self.ntotal, self.dim), dtype=dtype, device=self.device)
        self._db_sq = torch.empty(self.ntotal, dtype=torch.float32, device=self.device)
        for s, part in self._slices(database):
            self._db_sq[s : s + len(part)] = (part * part).sum(dim=1)
            if not half:
                self._db[s : s + len(part)] = part
        # fp16 holds x / max|x| (a second pass), so that no dot product can overflow fp16.
        top = float(self._db_sq.max().sqrt()) if self.ntotal else 0.0
        self._scale = top if half and top > 0 else 1.0
        if half:
            for s, part in self._slices(database):
                self._db[s : s + len(part)] = part / self._scale

    def _slices(self, database: np.ndarray, step: int = 65_536) -> Iterator[tuple[int, Any]]:
        import torch

        for s in range(0, self.ntotal, step):
            if isinstance(database, np.ndarray):
                rows = np.ascontiguousarray(database[s : s + step], dtype=np.float32)
                yield s, torch.from_numpy(rows).to(self.device)
            else:  # a torch tensor (e.g. features already on the GPU): no trip through the host
                yield s, database[s : s + step].to(self.device, torch.float32)

    def search(
        self, queries: np.ndarray, k: int, *, batch_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, row positions), each n x k, nearest first, -1/inf padded."""
        import torch

        n = queries.shape[0]
        dist = np.full((n, k), np.inf, dtype=np.float32)
        rows = np.full((n, k), -1, dtype=np.int64)
        if self.ntotal == 0 or n == 0:
            return dist, rows
        kk = min(k, self.ntotal)
        with torch.no_grad():
            for s in range(0, n, batch_size):
                q = torch.from_numpy(np.ascontiguousarray(queries[s : s + batch_size]))
                d, r = self._search_batch(q.to(self.device, torch.float32), kk)
                dist[s : s + len(q), :kk] = d.cpu().numpy()
                rows[s : s + len(q), :kk] = r.cpu().numpy()
        return dist, rows

    def _search_batch(self, q: Any, k: int) -> tuple[Any, Any]:
        q_sq = (q * q).sum(dim=1, keepdim=True)
        qm = (q / self._scale).to(self._db.dtype)
        step = self.chunk_rows or max(1024, _DISTANCE_ELEMENTS // max(1, q.shape[0]))
        return nearest(
            qm,
            lambda s, e: self._db[s:e],
            self._db_sq,
            k,
            block_rows=step,
            query_norms=q_sq,
            product_scale=self._scale**2,
        )


def _choose_precision(precision: str, database: np.ndarray, device: Any) -> str:
    if precision not in ("auto", "float32", "float16"):
        raise RetrieveError(f"precision must be auto, float32 or float16, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "float32"
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    need = database.shape[0] * database.shape[1] * 4
    # Leave room for the distance matrices and the caller's own tensors (the model).
    if need < 0.7 * free:
        return "float32"
    if need / 2 < 0.9 * free:
        return "float16"
    raise RetrieveError(
        f"{need / 2e9:.1f} GB of fp16 vectors do not fit in {free / 1e9:.1f} GB of free GPU memory"
    )


def faiss_message(e: BaseException) -> str:
    """The useful tail of a faiss C++ exception ('Error in ... at file:line: <this>')."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rsplit(": ", 1)[-1] if "Error in" in text else text
