"""The two stages a Ray cluster runs: decoding in CPU tasks, fc7 in long-lived model actors.

Both take and give Ray Data batches (dicts of NumPy columns). Decoding uses the project's own
reader and safe decoder (:mod:`retrieval.extraction.reader`), never Ray's ``read_images``, which
fails the whole job on one corrupt file: here a bad file is a row with ``reason`` set and zero
pixels, and it travels on so the driver can record it. The actor loads the weights by path once,
refuses them if their sha256 is not the one the driver planned with, and keeps the model.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from retrieval.errors import SkipReason, WeightsError
from retrieval.extraction.reader import decode_on_cpu, read_file
from retrieval.extraction.types import FileRecord, StageTimes
from retrieval.model.preprocess import Preprocessing


def _read_member(key: int, path: str, tar: str, offset: int, length: int, mtime_ns: int):
    """Bytes of one tar member (its offset and length come from the manifest)."""
    record = FileRecord(key, path, size=length, mtime_ns=mtime_ns)
    try:
        with open(tar, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except OSError as exc:
        record.reason, record.detail = SkipReason.UNREADABLE.value, exc.strerror or str(exc)
        return record, None
    if len(data) != length:
        record.reason, record.detail = SkipReason.TRUNCATED.value, "tar shard ends early"
        return record, None
    record.sha256 = hashlib.sha256(data).hexdigest()
    return record, data


def read_part_lists(batch: Any, rows_per_block: int) -> Iterator[Any]:
    """Manifest part files (a ``part_list`` column of paths) -> their rows, as Arrow tables of
    ``rows_per_block`` rows. Each table is a block of its own: a map task works through one
    input block, so a part handed on whole (about 100,000 files) would be decoded by one task
    on one core however many the cluster has."""
    import pyarrow.parquet as pq

    for path in batch.column("part_list").to_pylist():
        table = pq.read_table(path)
        for start in range(0, table.num_rows, rows_per_block):
            yield table.slice(start, rows_per_block)


def decode_batch(
    batch: dict[str, np.ndarray],
    preprocessing: dict[str, Any],
    max_megapixels: float,
    gpu_decode: bool = False,
) -> dict[str, np.ndarray]:
    """Files of a manifest part -> uint8 crops and records; never raises for a bad file.

    With ``gpu_decode``, a JPEG nvjpeg takes (and that Pillow's draft would not do better,
    :func:`retrieval.extraction.cuda.better_on_cpu`) travels on as its bytes in ``jpeg`` and
    the model actor decodes it on its GPU; everything else is decoded here.
    """
    from retrieval.extraction.cuda import better_on_cpu
    from retrieval.images.jpeg import inspect_jpeg

    prep = Preprocessing.from_dict(preprocessing)
    keys = batch["key"]
    pixels = np.zeros((len(keys), prep.channels, prep.crop, prep.crop), dtype=np.uint8)
    jpegs: list[bytes] = [b""] * len(keys)
    out: dict[str, list] = {name: [] for name in ("size", "mtime", "sha256", "reason", "detail")}
    for i, key in enumerate(keys):
        path = str(batch["path"][i])
        tar = batch["tar"][i]
        if not tar:
            record, data, _ = read_file(int(key), path)
        else:
            record, data = _read_member(
                int(key),
                path,
                str(tar),
                int(batch["offset"][i]),
                int(batch["length"][i]),
                int(batch["mtime_ns"][i]),
            )
        if data is not None:
            info = inspect_jpeg(data) if gpu_decode else None
            if (
                info is not None
                and info.gpu_decodable(max_megapixels)
                and not better_on_cpu(info, prep)
            ):
                jpegs[i] = bytes(data)
            else:
                crop = decode_on_cpu(record, data, StageTimes(), prep, max_megapixels)
                if crop is not None:
                    pixels[i] = crop.numpy()
        out["size"].append(record.size)
        out["mtime"].append(record.mtime_ns)
        out["sha256"].append(record.sha256)
        out["reason"].append(record.reason or "")
        out["detail"].append(record.detail)
    return {
        "key": np.asarray(keys, dtype=np.int64),
        "part": np.asarray(batch["part"], dtype=np.int64),
        "path": np.asarray(batch["path"], dtype=object),
        "size": np.asarray(out["size"], dtype=np.int64),
        "mtime": np.asarray(out["mtime"], dtype=np.int64),
        "sha256": np.asarray(out["sha256"], dtype=object),
        "reason": np.asarray(out["reason"], dtype=object),
        "detail": np.asarray(out["detail"], dtype=object),
        "pixels": pixels,
        "jpeg": np.asarray(jpegs, dtype=object),
    }


class Fc7Actor:
    """One model per actor process, kept across batches: crops (or JPEG bytes) in, fc7 out."""

    def __init__(
        self,
        weights: str,
        sha256: str,
        device: str,
        precision: str,
        threads: int | None,
        max_megapixels: float = 175.0,
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        import torch

        from retrieval.extraction.mapper import Fc7Mapper
        from retrieval.model.weights import load_model

        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(weights)
        if loaded.sha256 != sha256:
            raise WeightsError(
                f"{weights} on {os.uname().nodename} has weights {loaded.sha256[:12]}, the run "
                f"planned with {sha256[:12]}: every node must see the same weights file"
            )
        if preprocessing is not None:  # the run's (an index's recorded one), not the file's
            loaded.preprocessing = Preprocessing.from_dict(preprocessing)
        self.torch = torch
        self.mapper = Fc7Mapper(loaded, torch.device(device), precision)
        self.dim = loaded.fc7_dim
        self.max_megapixels = max_megapixels
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # which actor embedded a row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """fc7 of a batch; each row also says which actor ran it and its share of the batch's
        seconds, so the driver can show how the work spread."""
        started = time.perf_counter()
        reasons = [str(r) for r in batch["reason"]]
        details = [str(d) for d in batch["detail"]]
        jpegs = batch.get("jpeg")
        on_device = jpegs is not None and any(len(j) for j in jpegs)
        if on_device:
            crops = self._decode_on_device(batch, reasons, details)
        else:
            ok = np.asarray([not reason for reason in reasons], dtype=bool)
            picked = np.ascontiguousarray(batch["pixels"][ok])
            crops = self.torch.from_numpy(picked).to(self.mapper.device) if ok.any() else None
        ok = np.asarray([not reason for reason in reasons], dtype=bool)
        fc7 = np.zeros((len(ok), self.dim), dtype=np.float32)
        if crops is not None:
            fc7[ok] = self.mapper(crops).cpu().numpy()
        out = {name: value for name, value in batch.items() if name not in ("pixels", "jpeg")}
        out["reason"] = np.asarray(reasons, dtype=object)
        out["detail"] = np.asarray(details, dtype=object)
        out["fc7"] = fc7
        out["actor"] = np.full(len(ok), self.name, dtype=object)
        out["busy_seconds"] = np.full(len(ok), (time.perf_counter() - started) / max(len(ok), 1))
        return out

    def _decode_on_device(self, batch, reasons: list[str], details: list[str]):
        """nvjpeg for the JPEG bytes, the decode tasks' crops for the rest, in row order; a JPEG
        nvjpeg and then Pillow refuse gets its reason here."""
        from retrieval.extraction.cuda import _Jpeg, assemble, decode_items
        from retrieval.images.jpeg import inspect_jpeg

        torch, prep = self.torch, self.mapper.preprocessing
        items = []
        for i, reason in enumerate(reasons):
            record = FileRecord(i, str(batch["path"][i]), reason=reason or None)
            jpeg = batch["jpeg"][i]
            if reason:
                payload = None
            elif len(jpeg):
                data = torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)
                payload = _Jpeg(data, inspect_jpeg(jpeg))
            else:
                payload = torch.from_numpy(np.ascontiguousarray(batch["pixels"][i]))
            items.append((record, payload, StageTimes()))
        images, crops = decode_items(items, prep, self.mapper.device, self.max_megapixels)
        for i, (record, _, _) in enumerate(items):
            if record.reason and not reasons[i]:
                reasons[i], details[i] = record.reason, record.detail
        return assemble(images, crops, prep, self.mapper.device)
