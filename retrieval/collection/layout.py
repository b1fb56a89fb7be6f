"""A 2-D map of the collection: fc7 -> PCA (50) -> t-SNE (openTSNE), snapped to a grid.

t-SNE keeps neighbours together, which is what a map of "what looks alike" should show; the
points are then moved to the cells of a square grid by an optimal assignment (Hungarian,
scipy) so thumbnails tile the picture instead of piling on each other. Large collections are
sampled (``max_images``), seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.collection.vectors import IndexVectors, sample_positions
from retrieval.errors import RetrieveError

if TYPE_CHECKING:
    from retrieval.search.index import Index


@dataclass
class MapLayout:
    rows: list
    points: np.ndarray  # n x 2, the embedding
    cells: np.ndarray  # n x 2 int, (column, row) in a side x side grid
    side: int
    groups: list[str]  # per image: its label or "cluster N"


def embed_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """n x 2 by PCA to 50 components, then t-SNE (plain PCA for a handful of images)."""
    from sklearn.decomposition import PCA

    n = len(vectors)
    reduced = PCA(n_components=min(50, n, vectors.shape[1]), random_state=seed).fit_transform(
        vectors
    )
    if n < 10:
        out = np.zeros((n, 2))
        out[:, : min(2, reduced.shape[1])] = reduced[:, :2]
        return out
    from openTSNE import TSNE

    # One thread: openTSNE's thread pool spins when the cores are shared (40 s instead of
    # 0.3 s for 12 points on a loaded 2-core machine); Barnes-Hut below a few thousand points.
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3),
        random_state=seed,
        n_jobs=1,
        negative_gradient_method="bh" if n < 2000 else "fft",
        verbose=False,
    )
    return np.asarray(tsne.fit(reduced.astype(np.float64)))


def snap_to_grid(points: np.ndarray, slack: float = 1.25) -> tuple[np.ndarray, int]:
    """Each point to its own cell of a side x side grid (side^2 >= slack * n), moving the
    points as little as possible in total."""
    from scipy.optimize import linear_sum_assignment

    n = len(points)
    side = max(1, math.ceil(math.sqrt(n * slack)))
    low, high = points.min(axis=0), points.max(axis=0)
    scaled = (points - low) / np.where(high > low, high - low, 1) * (side - 1)
    ys, xs = np.mgrid[0:side, 0:side]
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    cost = ((scaled[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    taken, chosen = linear_sum_assignment(cost)
    cells = np.empty((n, 2), np.int64)
    cells[taken] = centres[chosen].astype(np.int64)
    return cells, side


def map_layout(
    index: Index, *, max_images: int = 1500, color: str = "label", seed: int = 0
) -> MapLayout:
    """Where each (sampled) image goes on the map, and the group that colours it."""
    source = IndexVectors(index)
    if source.count < 2:
        raise RetrieveError("a map needs at least 2 indexed images")
    picked = sample_positions(source.count, max_images, seed)
    rows = [source.rows[p] for p in picked]
    vectors = source.take(picked)
    if color == "cluster":
        from retrieval.collection.clusters import default_cluster_count, kmeans
        from retrieval.collection.vectors import ArrayVectors

        k = default_cluster_count(len(rows))
        assignment = kmeans(ArrayVectors(vectors), k, seed=seed).assignment
        groups = [f"cluster {int(c)}" for c in assignment]
    elif color == "label":
        groups = [r.label or "(no label)" for r in rows]
    else:
        raise RetrieveError("--color must be label or cluster")
    points = embed_2d(vectors, seed)
    cells, side = snap_to_grid(points)
    return MapLayout(rows, points, cells, side, groups)
