"""A classifier's confusion matrix as a picture: true classes down, predicted across, each cell
coloured by its share of the true class's images (rows sum to 1) and labelled with its count.

Drawn with matplotlib (as the training curves are: axes with class names, a colour bar). Up to
``LABELLED`` classes every row and column is named and up to ``COUNTED`` every cell carries its
count; past that the picture shows the pattern only, and ``largest_confusions`` lists the cells
a reader would look for (``retrieve evaluate`` prints them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_write

COUNTED = 30  # classes up to which each cell shows its count
LABELLED = 80  # classes up to which each row and column is named


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each true class's row as shares of its images (a class with none stays 0)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def largest_confusions(
    matrix: np.ndarray, labels: Sequence[str], n: int = 10
) -> list[dict[str, Any]]:
    """The ``n`` largest off-diagonal cells (count > 0): which class was taken for which."""
    matrix = np.asarray(matrix)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:n]
    cells = []
    for flat in order:
        true, predicted = divmod(int(flat), matrix.shape[1])
        count = int(off[true, predicted])
        if count <= 0:
            break
        total = int(matrix[true].sum())
        cells.append(
            {
                "true": labels[true],
                "predicted": labels[predicted],
                "count": count,
                "share_of_true": count / total if total else 0.0,
            }
        )
    return cells


def confusion_figure(matrix: np.ndarray, labels: Sequence[str], title: str = "") -> Any:
    """A matplotlib ``Figure`` of the matrix (not saved: ``save_confusion`` writes it)."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    n = len(labels)
    side = min(max(5.0 + 0.32 * n, 6.0), 30.0)
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    axes = figure.subplots()
    shares = row_normalised(matrix)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's images")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if n <= LABELLED:
        font = 9 if n <= 20 else 7 if n <= 40 else 5
        axes.set_xticks(range(n), labels=list(labels), rotation=60, ha="right", fontsize=font)
        axes.set_yticks(range(n), labels=list(labels), fontsize=font)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    if n <= COUNTED:
        for (true, predicted), count in np.ndenumerate(matrix):
            if count:
                dark = shares[true, predicted] > 0.5
                axes.text(
                    predicted,
                    true,
                    str(int(count)),
                    ha="center",
                    va="center",
                    fontsize=8 if n <= 15 else 6,
                    color="white" if dark else "black",
                )
    said = f"{int(matrix.sum())} images, {n} classes"
    if n > LABELLED:
        said += " (too many to name: `retrieve evaluate` lists the largest confusions)"
    axes.set_title(f"{title}\n{said}" if title else said, fontsize=10)
    return figure


def save_confusion(
    matrix: np.ndarray, labels: Sequence[str], output: str | Path, title: str = ""
) -> Path:
    """Draw the matrix and write it atomically (PNG, or what the suffix says)."""
    output = Path(output)
    figure = confusion_figure(matrix, labels, title)
    fmt = (output.suffix.lstrip(".") or "png").lower()
    atomic_write(output, lambda tmp: figure.savefig(tmp, format=fmt))
    return output
