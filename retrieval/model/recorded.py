"""The model an index records, loaded and checked: what every road that embeds for an index
starts from (indexing, an update, queries, the server, the agreement check).

It lives with the model, not with indexing, so the read path (``retrieval.Index``'s queries)
does not import the write path. An index records its model in the manifest (``model.source``,
the weights' sha256, the architecture, the preprocessing and the precision, as ``identity``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import IndexMismatchError, WeightsError
from retrieval.model.identity import Identity

if TYPE_CHECKING:
    from retrieval.model.weights import LoadedModel

# A bf16 index may be queried in fp32 (where bf16 is emulated) only when its own measurement,
# the top-6 overlap of fp32 and bf16 embeddings of a sample (``fp32_agreement``), is this high.
REQUIRED_OVERLAP = 0.99


def load_recorded_model(manifest: dict[str, Any]) -> LoadedModel:
    """The model a manifest names, with a clear line when its file has moved."""
    from retrieval.model.weights import load_model

    source = manifest["model"]["source"]
    known = ("imagenet", "random")
    if not str(source).startswith(known) and not Path(source).exists():
        sha = manifest["identity"]["weights_sha256"][:12]
        raise WeightsError(
            f"the weights this index was built with are no longer at {source} (moved or "
            f"deleted?); pass --weights PATH of a file with the same weights (sha256 {sha}...)"
        )
    try:
        return load_model(source)
    except WeightsError as exc:
        raise WeightsError(
            f"cannot load the model this index was built with ({exc}); pass it with --weights"
        ) from exc


def checked_model(
    recorded: Identity,
    model: LoadedModel,
    precision: str | None,
    *,
    what: str,
    querying: bool = False,
) -> tuple[LoadedModel, str]:
    """``model`` set up to embed as ``recorded`` says (its preprocessing), and the precision to
    embed at; or refused with the one part that differs (weights, architecture, layer, width,
    precision) and what to do: ``querying`` an index, use its own model; building one, rebuild."""
    from retrieval.model.preprocess import Preprocessing

    if precision == "auto":
        precision = None
    candidate = model.identity(
        precision or recorded.precision, reduce=recorded.reduce, normalize=recorded.normalize
    )
    candidate = dataclasses.replace(candidate, preprocessing=recorded.preprocessing)
    why = recorded.difference(candidate)
    if why:
        hint = "add --rebuild to rebuild it with this model"
        if why.startswith("precision"):
            hint = "leave out --precision (or add --rebuild to rebuild it)"
        elif querying:
            hint = (
                "leave out --weights to use the index's own model, or rebuild the index with "
                f"this one (retrieve index FOLDER --weights {model.source} --rebuild)"
            )
        raise IndexMismatchError(f"{model.source} does not fit {what}: {why}; {hint}")
    model.preprocessing = Preprocessing.from_dict(recorded.preprocessing)
    return model, candidate.precision


def fp32_allowed(manifest: dict[str, Any]) -> bool:
    """Whether a bf16 index's own measurement allows fp32 queries."""
    measured = manifest.get("fp32_agreement") or {}
    return float(measured.get("top6_overlap", 0.0)) >= REQUIRED_OVERLAP
