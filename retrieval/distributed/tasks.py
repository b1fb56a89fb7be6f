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


def read_part_lists(batch: Any) -> Any:
    """Manifest part files (a ``part_list`` column of paths) -> their rows, as one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path) for path in batch.column("part_list").to_pylist()])


def decode_batch(
    batch: dict[str, np.ndarray], preprocessing: dict[str, Any], max_megapixels: float
) -> dict[str, np.ndarray]:
    """Files of a manifest part -> uint8 crops and records; never raises for a bad file."""
    prep = Preprocessing.from_dict(preprocessing)
    keys = batch["key"]
    pixels = np.zeros((len(keys), prep.channels, prep.crop, prep.crop), dtype=np.uint8)
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
    }


class Fc7Actor:
    """One model per actor process, kept across batches: uint8 crops in, fc7 rows out."""

    def __init__(
        self, weights: str, sha256: str, device: str, precision: str, threads: int | None
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
        self.torch = torch
        self.mapper = Fc7Mapper(loaded, torch.device(device), precision)
        self.dim = loaded.fc7_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([not reason for reason in batch["reason"]], dtype=bool)
        fc7 = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            crops = self.torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            fc7[ok] = self.mapper(crops.to(self.mapper.device)).cpu().numpy()
        out = {name: value for name, value in batch.items() if name != "pixels"}
        out["fc7"] = fc7
        return out
