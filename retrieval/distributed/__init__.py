"""Extraction beyond one process: a folder, a list of paths or tar shards -> fc7 shards.

``retrieve extract SRC --out DIR [--engine local|ray]`` is :func:`extract_to_shards`. Both
engines plan the same manifest (:mod:`retrieval.distributed.manifest`: a stable int64 key per
file, parts of about 100,000 files), write the same export layout
(:mod:`retrieval.indexes.shards`) and resume by part. The Ray engine
(:mod:`retrieval.distributed.engine`) decodes in CPU tasks with the project's safe decoder and
runs the model in long-lived actors (one GPU each on a GPU cluster); Ray is an optional extra
(``pip install 'retrieve[ray]'``) imported only when that engine runs.
:mod:`retrieval.distributed.ivf_merge` builds an IVF index from the shards block by block
(Ray tasks when connected) and merges it on disk (faiss ``merge_ondisk``).
"""

from __future__ import annotations

from pathlib import Path

from retrieval.distributed.engine import RayOptions, RunReport, extract_with_ray
from retrieval.distributed.local import extract_locally
from retrieval.distributed.manifest import Source
from retrieval.errors import RetrieveError
from retrieval.extraction.types import ExtractOptions

__all__ = [
    "RayOptions",
    "RunReport",
    "Source",
    "extract_locally",
    "extract_to_shards",
    "extract_with_ray",
]

ENGINES = ("local", "ray")


def extract_to_shards(
    source: str | Path | None,
    out: str | Path,
    *,
    weights: str = "imagenet",
    engine: str = "local",
    files_from: str | Path | None = None,
    extract: ExtractOptions = ExtractOptions(),
    ray: RayOptions | None = None,
) -> RunReport:
    """fc7 of every image in ``source`` (or listed in ``files_from``) as shards in ``out``.

    Running it again with the same arguments resumes: finished parts are kept. ``extract``
    configures the local engine, ``ray`` the Ray engine (its device and precision included);
    ``ray.part_files`` sets the parts of both.
    """
    if engine not in ENGINES:
        raise RetrieveError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if source is None and files_from is None:
        raise RetrieveError("give a folder, tar shards or --files-from LIST")
    parsed = Source.parse(source, files_from)
    ray = ray or RayOptions()
    if engine == "ray":
        return extract_with_ray(parsed, str(weights), Path(out), ray)
    return extract_locally(parsed, str(weights), Path(out), extract, ray.part_files)
