"""Query images to fc7 with an index's own model, so they land among the indexed vectors.

``retrieval.Index`` holds one :class:`QueryEmbedder`. It loads the model on the first image it
must embed (not when the index opens: a search by stored vectors needs none), checks it against
the identity of the generation the index has open *then* (a reload may swap it), and sets it to
that generation's preprocessing and precision. Every vector goes through one
:class:`~retrieval.extraction.embedder.Embedder`; the model checks are the model package's
(``retrieval.model.recorded``), so the read path imports nothing of the write path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions
from retrieval.model.identity import Identity

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.extraction.embedder import Embedder
    from retrieval.model.weights import LoadedModel

    # A query image: a file (or a folder of them), encoded bytes (an upload), or a PIL image.
    Query = str | os.PathLike | bytes | bytearray | Image.Image

log = logging.getLogger(__name__)


class QueryEmbedder:
    """The model of one open index, loaded once and shared by every thread that embeds."""

    def __init__(
        self,
        manifest: Callable[[], dict[str, Any]],
        *,
        what: str,
        weights: str | None = None,
        extract: ExtractOptions = ExtractOptions(),
    ) -> None:
        """``manifest`` returns the current generation's manifest (read at load time, so a
        reload's new identity is the one checked); ``what`` names the index in refusals;
        ``extract.device`` is the one device every embedding runs on."""
        self._manifest = manifest
        self._what = what
        self._weights = weights
        self._asked = extract  # as the caller gave them: precision may be None or "auto"
        self._lock = threading.Lock()
        self._queries: Embedder | None = None
        self._indexing: Embedder | None = None

    def _loaded(self) -> Embedder:
        with self._lock:
            if self._queries is None:
                self._queries = self._load()
            return self._queries

    def _load(self) -> Embedder:
        from retrieval.extraction.embedder import Embedder
        from retrieval.model.recorded import checked_model, load_recorded_model
        from retrieval.model.weights import load_model

        manifest = self._manifest()
        loaded = load_model(self._weights) if self._weights else load_recorded_model(manifest)
        # What the caller asked, not what the last load resolved: a rebuilt index may have
        # another precision, which a resolved "fp32" would refuse.
        asked, identity = self._asked.precision, Identity.from_dict(manifest["identity"])
        loaded, precision = checked_model(identity, loaded, asked, what=self._what, querying=True)
        if identity.precision == "bf16" and asked in (None, "auto"):
            precision = self._bf16_or_fp32(manifest)
        return Embedder(loaded, precision, self._asked)

    def _bf16_or_fp32(self, manifest: dict[str, Any]) -> str:
        """A bf16 index's queries: bf16 where it is native (GPUs, CPUs with AVX-512 BF16 / AMX),
        so an indexed image finds itself at distance 0; where it is emulated (~6x slower), fp32
        if the index measured that fp32 finds the same neighbours (``fp32_agreement``)."""
        from retrieval.devices import fast_bf16, resolve_device
        from retrieval.model.recorded import fp32_allowed

        if fast_bf16(resolve_device(self._asked.device)) or not fp32_allowed(manifest):
            return "bf16"
        log.info(
            "embedding queries in fp32: bf16 is not native here, and the index measured a "
            "top-6 overlap of %s between the two",
            manifest["fp32_agreement"]["top6_overlap"],
        )
        return "fp32"

    @property
    def model(self) -> LoadedModel:
        """Loaded on first use, checked against the identity, set to its preprocessing."""
        return self._loaded().loaded

    @property
    def queries(self) -> Embedder:
        """What queries are embedded with (loads the model)."""
        return self._loaded()

    def for_indexing(self) -> Embedder | None:
        """The loaded model at the index's own precision, for an update (which must store what
        a run of ``retrieve index`` stores, never a query's fp32); None if not loaded yet."""
        with self._lock:
            if self._queries is None:
                return None
            if self._indexing is None:
                recorded = self._manifest()["identity"]["precision"]
                self._indexing = self._queries.at_precision(recorded)
            return self._indexing

    def forget(self) -> None:
        """Drop the model: the index was rebuilt with another, loaded when next needed."""
        with self._lock:
            self._queries = self._indexing = None

    @property
    def precision(self) -> str:
        """What queries are embedded at, as resolved when the model loaded (so it loads it)."""
        return self._loaded().precision

    def embed(
        self, queries: Sequence[Query], *, flip: bool = False
    ) -> tuple[np.ndarray, list[Any]]:
        """Files go through the extraction reader; bytes, PIL images and flipped files are
        decoded here, with an unreadable file a record, not an error."""
        embedder = self._loaded()
        files = [q for q in queries if isinstance(q, str | os.PathLike)]
        if files and len(files) != len(queries):
            raise RetrieveError("give files, or images in memory, not both in one call")
        if files and not flip:
            return embedder.all_files([Path(q) for q in files])
        read = [_read(q) for q in queries] if files else [(q, None) for q in queries]
        features, records = embedder.images([data for data, _ in read], flip=flip)
        for record, query, (_, why) in zip(records, queries, read):
            if files:
                record.path = str(query)
            if why:
                record.reason, record.detail = "unreadable", why
        return features, records

    def embed_files(self, paths: Sequence[Path]) -> Iterator[Any]:
        """Batches of ``ExtractedBatch``, streamed (memory flat for any number of files)."""
        yield from self._loaded().files(paths)

    def predict(self, features: np.ndarray, top: int = 5) -> list[list[tuple[str, float]]]:
        """The model's own head on fc7 rows, softmaxed: ``top`` (class, probability) a row."""
        import torch

        model = self.model
        if not model.classes:
            return [[] for _ in features]
        with torch.inference_mode():
            logits = model.model.forward_head(
                torch.from_numpy(np.asarray(features)).to(next(model.model.parameters()).device)
            )
            probs, picks = logits.float().softmax(1).topk(min(top, logits.shape[1]), dim=1)
        return [
            [(model.classes[int(c)], float(p)) for p, c in zip(row_p, row_c)]
            for row_p, row_c in zip(probs.cpu(), picks.cpu())
        ]


def _read(path: str | os.PathLike) -> tuple[bytes, str | None]:
    """A query file's bytes, or no bytes and why it could not be read."""
    try:
        return Path(path).read_bytes(), None
    except OSError as exc:
        return b"", exc.strerror or str(exc)
