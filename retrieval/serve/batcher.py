"""Model work for the server: one thread runs the model, concurrent uploads share its batches.

The event loop only parses and formats; every upload waits in a queue for the one model thread
(PyTorch on a CPU already uses every core for one batch, so two model threads would only fight).
Uploads that arrive while a batch runs go through together as the next batch: one fc7 pass, one
search, one row lookup, which is what keeps 16 clients at a bounded p99 on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from retrieval import Index, QueryResult, RetrieveError

log = logging.getLogger(__name__)

# Largest batch the model thread takes at once; bigger batches add latency for the first in line.
MAX_BATCH = 16


@dataclass
class Upload:
    """One image to answer: its bytes, how many neighbours, and the name it is reported by."""

    data: bytes
    k: int
    name: str = "<upload>"


@dataclass
class Answer:
    result: QueryResult
    classes: list[tuple[str, float]] = field(default_factory=list)


def answer_uploads(index: Index, uploads: list[Upload]) -> list[Answer]:
    """fc7 of every upload in one pass, the model's top-5 classes, and the k nearest indexed
    images of each (one search for the batch, at its largest k, in one generation)."""
    features, records = index.embed([u.data for u in uploads])
    answers = [Answer(QueryResult(query=u.name)) for u in uploads]
    good = [i for i, record in enumerate(records) if record.ok]
    for answer, record in zip(answers, records):
        if not record.ok:
            answer.result.error = record.reason + (f" ({record.detail})" if record.detail else "")
    if not good:
        return answers
    for slot, classes in zip(good, index.predict(features)):
        answers[slot].classes = classes
    k = max(uploads[i].k for i in good)
    names = [uploads[i].name for i in good]
    found = index.search(features, k, names=names)
    for slot, result in zip(good, found):
        result.neighbors = result.neighbors[: uploads[slot].k]  # nearest first: a prefix
        answers[slot].result = result
    return answers


class QueryBatcher:
    """A worker thread that answers :class:`Upload` s in batches; ``await ask(upload)``."""

    def __init__(self, index: Index, max_batch: int = MAX_BATCH) -> None:
        self.index = index
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="retrieve-model", daemon=True)
        self._thread.start()

    async def ask(self, upload: Upload) -> Answer:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((upload, future, loop))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            try:
                outcomes = answer_uploads(self.index, [upload for upload, _, _ in batch])
            except RetrieveError as error:  # the user's to read (an empty index): no traceback
                outcomes = [error] * len(batch)
            except Exception as error:  # handed to every waiting request, never kills the thread
                log.exception("a batch of %d queries failed", len(batch))
                outcomes = [error] * len(batch)
            for (_, future, loop), outcome in zip(batch, outcomes):
                # RuntimeError: that request's event loop has shut down meanwhile.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future, outcome: Answer | BaseException) -> None:
    if future.done():  # the client went away
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def top_classes(index: Index, ids: list[int]) -> list[tuple[str, float]]:
    """The model's top-5 classes for an indexed image, from its stored fc7 (no decoding); none
    when the model cannot be loaded (the neighbours need only the stored vectors)."""
    try:
        return index.predict(np.asarray(index.vectors(ids), np.float32))[0]
    except RetrieveError as error:
        log.warning("no classes for row %s: %s", ids[0], error)
        return []
