"""k-means clusters of fc7 (the paper's section 6.1 use: images near in fc7 are alike).

``faiss.Kmeans``, seeded. A large collection is clustered in a PCA copy (``pca_dim``
components, trained on a sample) so the vectors fit in memory; assignments are made a block
at a time. Each image gets its cluster and its Euclidean distance to that centroid; outliers
are the images farthest from every centroid. With folder labels, purity and NMI say how well
clusters follow them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.collection.near import NearOptions, reduce
from retrieval.collection.vectors import IndexVectors, VectorSource, blocks, sample_positions
from retrieval.errors import RetrieveError
from retrieval.results import EMPTY_INDEX

if TYPE_CHECKING:
    from retrieval.search.index import Index

# Above this many floats (N x D; 512 MiB of float32) k-means runs on a PCA copy.
PCA_ABOVE = 1 << 27
# Clusters when none are asked for: enough to sort a collection into kinds, few enough to
# look at each sheet. The CLI, the page and the map's colours all start here.
DEFAULT_CLUSTERS = 10


def default_cluster_count(count: int) -> int:
    """How many clusters ``count`` images get when the user names none."""
    return max(1, min(DEFAULT_CLUSTERS, count))


@dataclass
class Clustering:
    assignment: np.ndarray  # cluster per position
    distance: np.ndarray  # Euclidean distance to its centroid (in the space clustered)
    centroids: np.ndarray
    reduced_to: int | None = None

    def outliers(self, n: int) -> np.ndarray:
        """Positions of the ``n`` images farthest from every centroid, farthest first."""
        return np.argsort(-self.distance, kind="stable")[:n]

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignment, minlength=len(self.centroids))


def kmeans(
    source: VectorSource,
    k: int,
    *,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 3,
    pca_dim: int | None = None,
    train_sample: int = 100_000,
) -> Clustering:
    """Cluster every vector of ``source`` into ``k`` groups (``pca_dim``: reduce first;
    None: only when the vectors would not fit comfortably in memory)."""
    import faiss

    if not 1 <= k <= source.count:
        raise RetrieveError(f"-n must be between 1 and the number of images ({source.count})")
    if pca_dim is None and source.count * source.dim > PCA_ABOVE:
        pca_dim = 256
    if pca_dim:
        _, data = reduce(source, NearOptions(dim=pca_dim, train_sample=train_sample, seed=seed))
        get = lambda positions: data[positions]  # noqa: E731
        dim = data.shape[1]
    else:
        get, dim = source.take, source.dim
    train = get(sample_positions(source.count, min(train_sample, 256 * k), seed))
    # nredo: the best of a few seeded starts; one start lands in a local minimum too often.
    # min_points_per_centroid=1: the whole collection is clustered, however small; faiss's
    # default (39) only prints "please provide at least 156 training points" for 25 photos.
    model = faiss.Kmeans(
        dim, k, niter=niter, nredo=nredo, seed=seed, verbose=False, min_points_per_centroid=1
    )
    model.train(np.ascontiguousarray(train, np.float32))
    assignment = np.empty(source.count, np.int64)
    distance = np.empty(source.count, np.float32)
    for positions in blocks(source.count):
        sq, nearest = model.index.search(np.ascontiguousarray(get(positions), np.float32), 1)
        assignment[positions] = nearest[:, 0]
        distance[positions] = np.sqrt(np.maximum(sq[:, 0], 0))
    return Clustering(assignment, distance, model.centroids, pca_dim)


def purity(labels: Sequence[Any], assignment: np.ndarray) -> float:
    """Share of images whose cluster's most common label is their own."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1]
    table = np.zeros((assignment.max() + 1, codes.max() + 1), np.int64)
    np.add.at(table, (assignment, codes), 1)
    return float(table.max(axis=1).sum() / len(codes))


def label_scores(labels: Sequence[Any], assignment: np.ndarray) -> dict[str, float] | None:
    """Purity and NMI against folder labels, or None when there are fewer than two labels."""
    if len(set(labels)) < 2:
        return None
    from sklearn.metrics import normalized_mutual_info_score

    nmi = normalized_mutual_info_score(list(labels), assignment.tolist())
    return {"purity": purity(labels, assignment), "nmi": float(nmi)}


@dataclass
class ClusterReport:
    rows: list
    clustering: Clustering
    scores: dict[str, float] | None


def cluster_index(
    index: Index, k: int, *, seed: int = 0, pca_dim: int | None = None
) -> ClusterReport:
    """Cluster every indexed image of ``index``; scores when the images carry labels."""
    source = IndexVectors(index)
    if source.count < 1:
        raise RetrieveError(f"nothing to cluster: {EMPTY_INDEX}")
    clustering = kmeans(source, k, seed=seed, pca_dim=pca_dim)
    scores = label_scores([r.label for r in source.rows], clustering.assignment)
    return ClusterReport(source.rows, clustering, scores)
