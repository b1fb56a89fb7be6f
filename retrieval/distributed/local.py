"""The local engine into the same shards: one process, the project's own pipeline.

It plans the same manifest as the Ray engine (same keys, same parts) and runs
:func:`retrieval.extraction.extract_fc7` on each part, so the two engines' outputs can be
compared file for file, and a local run resumes by part as a Ray run does.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from retrieval.devices import choose_precision
from retrieval.distributed.engine import RunReport
from retrieval.distributed.manifest import PART_FILES, Source, plan, read_part
from retrieval.errors import RetrieveError
from retrieval.extraction import extract_fc7
from retrieval.extraction.types import ExtractOptions
from retrieval.images.walk import label_of
from retrieval.indexes.shards import ShardRows, SkippedRows, write_identity, write_shard


def extract_locally(
    source: Source,
    weights: str,
    out: Path,
    options: ExtractOptions = ExtractOptions(),
    part_files: int = PART_FILES,
) -> RunReport:
    """fc7 shards of ``source`` in ``out``, one part at a time in this process."""
    from retrieval.model.weights import load_model

    if source.kind == "tar":
        raise RetrieveError("tar shards are read by --engine ray only; unpack them for local")
    started = time.perf_counter()
    loaded = load_model(weights)
    options = replace(options, precision=choose_precision(options.precision, options.device))
    identity = {**loaded.describe(), "precision": options.precision}
    out = Path(out)
    write_identity(out, identity, loaded.fc7_dim)
    manifest = plan(out, source, identity, part_files)
    report = RunReport(out, actors=0)
    for part in manifest.parts:
        if (out / f"fc7-{part.number:05d}.npy").exists():
            report.parts_done_before += 1
            continue
        files = read_part(out, manifest, part.number)
        rows, skipped, chunks = ShardRows(), SkippedRows(), []
        paths = [Path(p) for p in files["path"]]
        for batch in extract_fc7(paths, loaded, options):
            chunks.append(batch.features)
            for record in batch.records:
                key = files["key"][record.position]
                if record.ok:
                    rows.id.append(key)
                    rows.path.append(record.path)
                    rows.label.append(label_of(record.path))
                    rows.sha256.append(record.sha256)
                    rows.size.append(record.size)
                    rows.mtime.append(record.mtime_ns)
                else:
                    skipped.id.append(key)
                    skipped.path.append(record.path)
                    skipped.reason.append(str(record.reason))
                    skipped.detail.append(record.detail)
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, loaded.fc7_dim), np.float32)
        write_shard(out, part.number, vectors, rows, skipped)
        report.parts_written.append(part.number)
        report.images += len(rows)
        report.skipped += len(skipped)
    report.seconds = time.perf_counter() - started
    return report
