"""Training curves from a run's metrics rows (the ``.metrics.jsonl`` log): training loss,
validation top-1 / top-5, validation fc7 precision@6 and mAP, and the learning rate, one panel
each, with the epoch the checkpoint keeps marked.

Drawn with matplotlib (its object API on the Agg canvas: no pyplot state, no display, nothing
process-wide changed) rather than Pillow, which the other figures use: these are plots with axes,
ticks, legends and a log-free numeric scale, which Pillow would need a small plotting library
written by hand to draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.atomic import atomic_write
from retrieval.errors import RetrieveError

KEPT_COLOUR = "#c0392b"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.metrics.jsonl`` log, refused with one line if it holds none."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RetrieveError(f"cannot read metrics log {path}: {exc.strerror or exc}") from None
    try:
        rows = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as exc:
        raise RetrieveError(f"{path} is not a metrics log (line {exc.lineno}: not JSON)") from None
    rows = [r for r in rows if isinstance(r, dict) and "epoch" in r]
    if not rows:
        raise RetrieveError(f"{path} holds no epoch rows to plot")
    return rows


def kept_epoch(rows: Sequence[dict[str, Any]]) -> int | None:
    """The epoch the checkpoint keeps, as the last row says (logs before it was written: None)."""
    return rows[-1].get("kept_epoch") if rows else None


def curves_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """A matplotlib ``Figure`` of the four panels (not saved: ``save_curves`` writes it)."""
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    style = "o-" if len(rows) <= 40 else "-"  # a long run's markers hide its line
    figure = Figure(figsize=(10, 7), dpi=100)
    # Fixed margins: the constrained layout solver doubles the drawing time (0.3 s against
    # 0.15 s), and this figure is redrawn every epoch inside the time budget.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.91, hspace=0.25, wspace=0.22)
    (loss, acc), (fc7, lr) = figure.subplots(2, 2, sharex=True)
    _panel(loss, "training loss", "cross-entropy")
    loss.plot(epochs, [r.get("train_loss") for r in rows], style, label="train loss")
    _panel(acc, "validation accuracy", "accuracy (%)")
    for key, name in (("top1_error", "top-1"), ("top5_error", "top-5")):
        if not any(key in r for r in rows):
            continue  # top-5 of 5 classes or fewer: always right, so never measured
        acc.plot(epochs, [_percent_correct(r.get(key)) for r in rows], style, label=name)
    _panel(fc7, "validation fc7 retrieval", "score")
    for key in ("precision@6", "map"):
        if any(key in r for r in rows):
            name = "mAP" if key == "map" else key
            fc7.plot(epochs, [r.get(key, math.nan) for r in rows], style, label=name)
    _panel(lr, "learning rate (at the end of each epoch)", "learning rate")
    lr.plot(epochs, [r.get("lr", math.nan) for r in rows], style, color="#555555", label="lr")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    kept = kept_epoch(rows)
    for axes in (loss, acc, fc7, lr):
        if kept is not None:
            axes.axvline(kept, color=KEPT_COLOUR, linestyle="--", label=f"kept: epoch {kept}")
        axes.legend(loc="best", fontsize=8)
    for axes in (fc7, lr):
        axes.set_xlabel("epoch")
    last = rows[-1]
    total = last.get("epochs")
    said = f"epoch {last['epoch']}" + (f" of {total}" if total else "")
    figure.suptitle(f"{title} ({said})" if title else said)
    return figure


def _panel(axes: Any, title: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)


def _percent_correct(error: float | None) -> float:
    return math.nan if error is None else 100.0 * (1.0 - float(error))


def save_curves(rows: Sequence[dict[str, Any]], output: str | Path, title: str = "") -> Path:
    """Draw the curves and write them atomically (a viewer that reloads never sees half a PNG)."""
    output = Path(output)
    figure = curves_figure(rows, title)
    fmt = (output.suffix.lstrip(".") or "png").lower()
    atomic_write(output, lambda tmp: figure.savefig(tmp, format=fmt))
    return output


def curves_path(checkpoint: str | Path) -> Path:
    """``OUTPUT.curves.png`` beside the checkpoint (``model.pt`` -> ``model.curves.png``)."""
    return Path(checkpoint).with_suffix(".curves.png")
