"""Two aligned pictures compared block by block: one picture edited, or two shots of a scene?

A re-shoot of a still scene can pass the verifier's tests on its whole overlap, because the
static part dominates the correlation. An edited copy agrees block by block everywhere except
where something was painted on one of the two (a caption bar or a border along an edge, peeled
off first, or a small logo); a second shot has blocks that only roughly agree all over (the
view moved) or a connected patch of disagreeing blocks away from the edges (something moved).
"""

from __future__ import annotations

import numpy as np

SECOND_SHOT_GRID = 12  # blocks of about 10 x 10 px at 128 px: a moved object spans several
TEXTURED = 8.0  # a block's grey-level spread (std) from which it has something to compare
DISAGREE = 0.5  # a block pair correlating below this shows different things
# Bands along an edge where most blocks disagree are taken as painted (a caption bar over the
# picture: at most 22% of its height in bench/duplicates.py, so up to 3-4 lines of 12) and left
# out before looking for a moved object; a second shot whose difference lies only there passes.
EDGE_LINES = 4


def second_shot(
    x: np.ndarray,
    y: np.ndarray,
    keep: np.ndarray,
    *,
    block_median: float,
    moved_blocks: int,
    painted: bool = False,
) -> str | None:
    """Why two aligned pictures are two shots of one scene rather than one picture edited, or
    None when they look like one picture: the median correlation of the blocks textured in
    both under ``block_median``, or ``moved_blocks`` connected blocks that disagree.
    ``painted``: the pair is accepted as painted over (a caption on a textureless picture can
    be most of its texture), so the blocks' overall agreement is not asked again; a moved
    patch still is."""
    import cv2

    grid = SECOND_SHOT_GRID
    corr, spread_x, spread_y = _block_statistics(x, y, keep, grid)
    # flat in both says nothing; textured in one only counts (an object moved over a clear sky
    # is flat there), textured in both is what the overall agreement is judged on
    corr[np.maximum(spread_x, spread_y) < TEXTURED] = np.nan
    both = ~np.isnan(corr) & (np.minimum(spread_x, spread_y) >= TEXTURED)
    textured = ~np.isnan(corr)
    if not painted and both.sum() >= grid:
        median = float(np.median(corr[both]))
        if median < block_median:
            return f"a second shot: its blocks only roughly agree (median {median:.2f})"
    differ = textured & (np.nan_to_num(corr, nan=1.0) < DISAGREE)
    differ &= ~_painted_bands(textured, differ)
    count, labels = cv2.connectedComponents(differ.astype(np.uint8), connectivity=4)
    largest = max((int((labels == n).sum()) for n in range(1, count)), default=0)
    if largest >= moved_blocks:
        return f"a second shot: something moved ({largest} of {grid * grid} blocks differ)"
    return None


def _block_statistics(
    x: np.ndarray, y: np.ndarray, keep: np.ndarray, grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of a ``grid`` x ``grid`` split (numpy's array_split): the correlation of ``x``
    and ``y`` over the kept pixels (NaN where under 90% of the block is kept) and each one's
    standard deviation, from block sums in one pass instead of a loop over the blocks."""
    splits = [np.array_split(np.arange(n), grid) for n in x.shape]
    starts = [np.array([part[0] if len(part) else 0 for part in split]) for split in splits]
    sizes = [np.array([len(part) for part in split]) for split in splits]

    def sums(values: np.ndarray) -> np.ndarray:
        out = np.add.reduceat(np.add.reduceat(values, starts[0], axis=0), starts[1], axis=1)
        out[sizes[0] == 0, :] = 0  # reduceat gives a lone element for an empty slice
        out[:, sizes[1] == 0] = 0
        return out

    k = keep.astype(np.float64)
    a, b = x.astype(np.float64) * k, y.astype(np.float64) * k
    count = sums(k)
    area = np.outer(sizes[0], sizes[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a, mean_b = sums(a) / count, sums(b) / count
        var_a = np.maximum(sums(a * a) / count - mean_a**2, 0)
        var_b = np.maximum(sums(b * b) / count - mean_b**2, 0)
        cov = sums(a * b) / count - mean_a * mean_b
        norm = np.sqrt(var_a * var_b)
        corr = np.where(norm > 0, cov / np.where(norm > 0, norm, 1), 0.0)
        corr[(area == 0) | (count < 0.9 * area)] = np.nan
    return corr, np.sqrt(var_a), np.sqrt(var_b)


def _painted_bands(textured: np.ndarray, differ: np.ndarray) -> np.ndarray:
    """The blocks of the lines along each edge, up to EDGE_LINES deep, in which most textured
    blocks differ: where a caption bar or a band painted over the picture lies."""
    band = np.zeros(differ.shape, bool)
    for grid_t, grid_d, out in ((textured, differ, band), (textured.T, differ.T, band.T)):
        for order in (range(len(grid_t)), range(len(grid_t) - 1, -1, -1)):
            for depth, line in enumerate(order):
                if depth >= EDGE_LINES:
                    break
                seen = grid_t[line]
                if not seen.any():
                    continue  # nothing there to judge (a flat strip): look one line further in
                if grid_d[line][seen].mean() < 0.5:
                    break
                out[line] = True
    return band
