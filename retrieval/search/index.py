"""``retrieval.Index``: one collection's index, opened once, answering many calls.

The CLI, the server, the collection tools and a notebook are thin skins over this object (as
clip-retrieval's back keeps one KnnService per index, and rclip grew a server when loading the
model was most of a query's time). It holds the manifest, the open snapshot, a resident searcher
(memory-mapped, so opening reads no vectors) and, from the first image it must embed, the model
checked against the index's identity (a ``QueryEmbedder``). ``reload`` picks up a generation a
writer committed, never a mix; searches from several threads are safe, also while another thread
reloads.

    from retrieval import Index
    with Index.open("index") as ix:
        for result in ix.search(["cat.jpg"], k=6):
            print(result.to_dict())
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.build.options import IndexOptions, IndexReport
from retrieval.devices import one_device
from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions
from retrieval.indexes import store
from retrieval.indexes.rows import Row
from retrieval.indexes.searcher import Searcher
from retrieval.model.identity import Identity
from retrieval.results import QueryResult, check_k, expand_queries, neighbors_of
from retrieval.search.query_model import QueryEmbedder

if TYPE_CHECKING:
    from retrieval.model.weights import LoadedModel
    from retrieval.search.query_model import Query


class _View:
    """One generation: its snapshot and searcher, closed when retired and no call uses it."""

    def __init__(self, snapshot: store.Snapshot, device: str, scan: str = "fp32") -> None:
        self.snapshot = snapshot
        self.device = device
        self.scan = scan
        self.users = 0
        self.retired = False
        self._searcher: Searcher | None = None
        self._lock = threading.Lock()

    @property
    def searcher(self) -> Searcher:
        with self._lock:
            if self._searcher is None:
                self._searcher = Searcher(self.snapshot, self.device, self.scan)
            return self._searcher

    def close(self) -> None:
        self.snapshot.close()


class Index:
    """An index directory, open: :meth:`open` (or :meth:`create`), then ``close`` or ``with``."""

    def __init__(
        self,
        directory: Path,
        snapshot: store.Snapshot,
        *,
        weights: str | None = None,
        device: str = "auto",
        extract: ExtractOptions = ExtractOptions(),
        search_precision: str = "fp32",
    ) -> None:
        self.directory = directory
        self.device = one_device(device, extract.device)
        self.search_precision = search_precision
        self._lock = threading.Lock()
        self._embedder = QueryEmbedder(
            lambda: self.manifest,
            what=f"the index at {directory}",
            weights=weights,
            extract=dataclasses.replace(extract, device=self.device),
        )
        self._view = _View(snapshot, self.device, search_precision)
        self._closed = False
        self.report: IndexReport | None = None  # what the last create or update did

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike | None = None,
        *,
        weights: str | None = None,
        device: str = "auto",
        extract: ExtractOptions = ExtractOptions(),
        search_precision: str = "fp32",
    ) -> Index:
        """Open an index (default ``$RETRIEVE_INDEX`` or ``./.retrieve``). No model is loaded
        until an image must be embedded; ``weights`` replaces the recorded model file (it must
        have the same identity), ``device`` is where the model and the searches run.
        ``search_precision`` (exact Flat index on a CPU): ``fp32`` scans the mapped file;
        ``bf16`` (or ``auto``: where bf16 is native and the copy fits) scans a bf16 copy kept in
        memory, half the bytes, and re-ranks its best candidates exactly: for long-lived use."""
        device = one_device(device, extract.device)  # refused before anything is opened
        directory = Path(directory or store.default_index_dir())
        snapshot = store.open_snapshot(directory)
        return cls(
            directory,
            snapshot,
            weights=weights,
            device=device,
            extract=extract,
            search_precision=search_precision,
        )

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike | None,
        images: str | os.PathLike,
        options: IndexOptions = IndexOptions(),
        *,
        embeddings: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Index:
        """Index the images under ``images`` into ``directory`` (default ``$RETRIEVE_INDEX`` or
        ``./.retrieve``; new, or updated with only what changed) and open it; ``report`` says
        what the run did. ``embeddings``: ``images`` is a folder of fc7 shards (``retrieve
        export`` / ``retrieve extract``), made into a new index without running the model."""
        directory = Path(directory or store.default_index_dir())
        if embeddings:
            from retrieval.build.embeddings import index_from_embeddings

            report = index_from_embeddings(Path(images), directory, options)
        else:
            from retrieval.build.run import index_folder

            report = index_folder(Path(images), directory, options, progress)
        index = cls.open(
            directory,
            weights=options.weights,
            device=options.extract.device,
            extract=options.extract,
        )
        index.report = report
        return index

    # -- what it holds -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _use(self) -> Iterator[_View]:
        with self._lock:
            if self._closed:
                raise RetrieveError(f"the index at {self.directory} is closed")
            view = self._view
            view.users += 1
        try:
            yield view
        finally:
            with self._lock:
                view.users -= 1
                if view.retired and view.users == 0:
                    view.close()

    @property
    def manifest(self) -> dict[str, Any]:
        return self._view.snapshot.manifest

    @property
    def identity(self) -> Identity:
        return Identity.from_dict(self.manifest["identity"])

    @property
    def count(self) -> int:
        return self._view.snapshot.count

    @property
    def dim(self) -> int:
        return self._view.snapshot.dim

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def info(self) -> dict[str, Any]:
        """What ``retrieve info --json`` prints: counts, model, identity, kind, size on disk."""
        with self._use() as view:
            manifest, snapshot = view.snapshot.manifest, view.snapshot
            model, identity = manifest["model"], manifest["identity"]
            return {
                "index": os.path.abspath(self.directory),
                "count": snapshot.count,
                "skipped": int(manifest.get("skipped", 0)),
                "model": model["source"],
                "started_from": model.get("started_from"),  # a fine-tuned model's start
                "weights_sha256": identity["weights_sha256"],
                "arch": identity["arch"]["arch"],
                "layer": identity["layer"],
                "preprocessing": identity["preprocessing"],
                "precision": identity["precision"],
                "fp32_agreement": manifest.get("fp32_agreement"),
                "identity": {k: v for k, v in identity.items() if k != "assumed"},
                "assumed": list(identity.get("assumed", [])),
                "dim": snapshot.dim,
                "metric": manifest["metric"],
                "index_type": manifest["index"],
                "format_version": manifest["version"],
                "generation": manifest["generation"],
                "created": manifest.get("created"),
                "updated": manifest.get("updated"),
                "size_bytes": snapshot.size_on_disk(),
                "labels": len(snapshot.label_counts()),
            }

    # -- the model (held by a QueryEmbedder) ---------------------------------------------------

    @property
    def model(self) -> LoadedModel:
        """The index's model, loaded once, checked against its identity, set to its
        preprocessing (so every embedding matches the indexed vectors)."""
        return self._embedder.model

    @property
    def precision(self) -> str:
        """The precision queries are embedded at (loads the model)."""
        return self._embedder.precision

    @property
    def classes(self) -> list[str] | None:
        """Class names of the model's head (a checkpoint trained with classes, or ImageNet's)."""
        return self.model.classes

    def embed(
        self, queries: Sequence[Query], *, flip: bool = False
    ) -> tuple[np.ndarray, list[Any]]:
        """fc7 of query images (files, bytes or PIL images), as the indexed images were
        embedded; returns (features of the good ones, one record per query: ok or why not).
        ``flip``: average each image's fc7 with its mirror image's."""
        return self._embedder.embed(queries, flip=flip)

    def embed_files(self, paths: Sequence[Path]) -> Iterator[Any]:
        """fc7 of many image files, a batch at a time (``ExtractedBatch``: records + features),
        so memory stays flat however many there are."""
        yield from self._embedder.embed_files(paths)

    def predict(self, features: np.ndarray, top: int = 5) -> list[list[tuple[str, float]]]:
        """The model's ``top`` classes for each fc7 row (its own head, softmaxed); [] per row
        when the model has no class names."""
        return self._embedder.predict(features, top)

    # -- searching -----------------------------------------------------------------------------

    def search(
        self,
        queries: Sequence[Query] | np.ndarray,
        k: int = 6,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        exclude_self: bool = False,
        names: Sequence[str] | None = None,
    ) -> list[QueryResult]:
        """The ``k`` nearest indexed images of each query (all of them, where the index holds
        fewer), by Euclidean distance of fc7, nearest first. Queries are image files or folders,
        encoded bytes, PIL images, or an ``(n, d)`` array of fc7 vectors (``names`` labels an
        array's rows). A query that cannot be used gets ``error``. ``exclude_self``: an indexed
        query file leaves itself out of its list."""
        if isinstance(queries, np.ndarray):
            return self._search_vectors(queries, k, names, nprobe, ef_search)
        queries = list(queries)
        if all(isinstance(q, str | os.PathLike) for q in queries):
            queries = [Path(os.path.abspath(p)) for p in expand_queries(queries)]
        with self._use() as view:
            check_k(k, view.snapshot.count)
            features, records = self.embed(queries)
            results = [QueryResult(query=str(r.path)) for r in records]
            for result, record in zip(results, records):
                if not record.ok:
                    result.error = record.reason + (f" ({record.detail})" if record.detail else "")
            good = [i for i, r in enumerate(records) if r.ok]
            if not good:
                return results
            skip = [-1] * len(good)
            if exclude_self:
                skip = [_own_id(view.snapshot, str(records[i].path)) for i in good]
            self._fill(view, results, good, features, skip, k, nprobe, ef_search)
            return results

    def neighbors(
        self,
        ids: Sequence[int],
        k: int = 6,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> list[QueryResult]:
        """The ``k`` nearest other images of indexed rows, from their stored vectors (nothing is
        decoded). KeyError for an id the index does not hold."""
        ids = [int(i) for i in ids]
        with self._use() as view:
            check_k(k, view.snapshot.count)
            rows = view.snapshot.rows_by_id(ids)
            missing = [i for i in ids if i not in rows or rows[i].status != "indexed"]
            if missing:
                raise KeyError(f"no indexed image has id {missing[0]}")
            vectors = view.searcher.reconstruct(np.asarray(ids, np.int64))
            results = [QueryResult(query=rows[i].path, query_id=i) for i in ids]
            self._fill(view, results, list(range(len(ids))), vectors, ids, k, nprobe, ef_search)
            return results

    def _search_vectors(
        self,
        features: np.ndarray,
        k: int,
        names: Sequence[str] | None,
        nprobe: int | None,
        ef_search: int | None,
    ) -> list[QueryResult]:
        """Results for fc7 rows already embedded: searched and joined to their rows in one
        generation, so a reload in between cannot mix two."""
        features = np.asarray(features, dtype=np.float32)
        names = (
            list(names) if names is not None else [f"<vector {i}>" for i in range(len(features))]
        )
        with self._use() as view:
            check_k(k, view.snapshot.count)
            results = [QueryResult(query=name) for name in names]
            slots = list(range(len(features)))
            self._fill(view, results, slots, features, [-1] * len(slots), k, nprobe, ef_search)
            return results

    def _fill(
        self,
        view: _View,
        results: list[QueryResult],
        slots: list[int],
        features: np.ndarray,
        skip: list[int],
        k: int,
        nprobe: int | None,
        ef_search: int | None,
    ) -> None:
        extra = 1 if any(i >= 0 for i in skip) else 0
        found_k = min(k + extra, view.snapshot.count)
        distances, ids = view.searcher.search(features, found_k, nprobe=nprobe, ef_search=ef_search)
        rows = view.snapshot.rows_by_id(ids.ravel())
        for n, slot in enumerate(slots):
            results[slot].neighbors = neighbors_of(distances[n], ids[n], rows, skip[n], k)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 6,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw k-NN of fc7 vectors: (Euclidean distances, row ids), each n x k, nearest first;
        inf / -1 where the index holds fewer than k rows."""
        with self._use() as view:
            return view.searcher.search(vectors, k, nprobe=nprobe, ef_search=ef_search)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of these row ids (exact for Flat kinds, decoded for compressed)."""
        with self._use() as view:
            return view.searcher.reconstruct(np.asarray(list(ids), np.int64))

    def id_of(self, path: str | os.PathLike) -> int | None:
        """The row id of an indexed file, or None."""
        with self._use() as view:
            found = _own_id(view.snapshot, str(path))
            return None if found < 0 else found

    @property
    def vectors_bytes(self) -> int:
        """Size of the vectors file on disk (what faiss's writer produced)."""
        return self._view.snapshot.vectors_bytes

    def warm(self) -> None:
        """Ready the searcher and load the model now, so the first query does not wait
        (RetrieveError when the model cannot be loaded; searches by stored vectors still work)."""
        with self._use() as view:
            view.searcher.prepare()
        self.model  # noqa: B018 (loads it)

    @property
    def backend(self) -> str:
        """Where searches run: exact-mapped-cpu, torch-cuda:N-..., faiss-cpu or faiss-gpu:N."""
        with self._use() as view:
            return view.searcher.backend

    def grid(
        self,
        queries: Sequence[str | os.PathLike],
        output: str | os.PathLike,
        *,
        k: int = 6,
        n: int = 5,
        seed: int = 0,
        tile: int = 128,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[Path, list[QueryResult]]:
        """The paper's Figure 4 for these query files (or ``n`` random images of each query
        folder, reproducibly by ``seed``), written to ``output``. A query that is itself indexed
        is left out of its own row, as the paper's test images are not among the training
        images they are shown beside."""
        from retrieval.figures.grid import pick_queries, render_grid

        picked = pick_queries([Path(q) for q in queries], n, seed)
        results = self.search(picked, k, nprobe=nprobe, ef_search=ef_search, exclude_self=True)
        return render_grid(results, Path(output), tile=tile), results

    # -- rows ----------------------------------------------------------------------------------

    def rows(
        self,
        ids: Sequence[int] | None = None,
        *,
        status: str | None = "indexed",
        under: str | None = None,
        label: str | None = None,
        contains: str | None = None,
        offset: int = 0,
        limit: int | None = 100,
    ) -> list[Row]:
        """Rows by id (in the order asked, unknown ids left out), or a page of rows in id order
        that pass the filters (``limit=None``: all of them)."""
        with self._use() as view:
            if ids is not None:
                found = view.snapshot.rows_by_id(ids)
                return [found[int(i)] for i in ids if int(i) in found]
            if limit is None:
                found = view.snapshot.iter_rows(status, under, label=label, contains=contains)
                return list(itertools.islice(found, offset, None))
            where = store.RowFilter(status=status, under=under, label=label, contains=contains)
            return view.snapshot.find_rows(where, offset, limit)

    def count_rows(
        self,
        *,
        status: str | None = "indexed",
        label: str | None = None,
        contains: str | None = None,
    ) -> int:
        with self._use() as view:
            where = store.RowFilter(status=status, label=label, contains=contains)
            return view.snapshot.count_rows(where)

    def labels(self) -> dict[str, int]:
        """Indexed rows per label (the parent folder's name), most common first."""
        with self._use() as view:
            return view.snapshot.label_counts()

    # -- changing it ---------------------------------------------------------------------------

    def update(
        self,
        folder: str | os.PathLike,
        options: IndexOptions = IndexOptions(),
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> IndexReport:
        """Make the index follow ``folder`` (only what changed is embedded), then reload."""
        from retrieval.build.run import index_folder

        extract = dataclasses.replace(
            options.extract, device=one_device(self.device, options.extract.device)
        )
        options = dataclasses.replace(options, extract=extract)
        # The queries' mapper shares the loaded model's modules: embedding on another device
        # would move them, so an update elsewhere loads its own model.
        same_place = extract.device == self.device
        reuse = not options.weights and not options.rebuild and same_place
        embedder = self._embedder.for_indexing() if reuse else None
        report = index_folder(Path(folder), self.directory, options, progress, embedder)
        self.reload()
        self.report = report
        return report

    def remove(self, paths: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
        """Drop these files (or everything under these folders) from the index (the files
        themselves are never touched), then reload. Returns removed and not-indexed paths."""
        from retrieval.build.commit import remove_from_index

        result = remove_from_index([Path(os.path.abspath(p)) for p in paths], self.directory)
        self.reload()
        return result

    def reload(self) -> bool:
        """Switch to the generation a writer committed since, if any; True when it did. Calls
        in flight finish on the generation they started on."""
        current = self.generation
        try:
            manifest = store.read_manifest(self.directory)
        except RetrieveError:
            return False
        if int(manifest["generation"]) == current:
            return False
        snapshot = store.open_snapshot(self.directory)
        view = _View(snapshot, self.device, self.search_precision)
        if self.search_precision != "fp32":
            try:
                view.searcher.prepare()  # while the old generation still answers
            except BaseException:
                view.close()
                raise
        with self._lock:
            old, self._view = self._view, view
            old.retired = True
            if old.users == 0:
                old.close()
        if Identity.from_dict(snapshot.manifest["identity"]) != Identity.from_dict(
            old.snapshot.manifest["identity"]
        ):
            self._embedder.forget()  # rebuilt with another model: load that one when needed
        return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._view.retired = True
            if self._view.users == 0:
                self._view.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.directory)!r}, {self.count} images, generation {self.generation})"


def _own_id(snapshot: store.Snapshot, path: str) -> int:
    row = snapshot.row_for_path(os.path.abspath(path))
    return row.id if row and row.status == "indexed" else -1
