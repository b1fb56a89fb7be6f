"""What a training run watches: a loss that blows up, the epoch worth keeping, and the lines a
user reads about both.

Kept apart from the loop (``loop.py``), which only drives the steps: these are the run's
judgements, each a few lines, and the messages that go with them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from retrieval.errors import RetrieveError
from retrieval.training.datasets import DataSplits
from retrieval.training.recipes import Recipe
from retrieval.training.validation import RETRIEVAL_K
from retrieval.units import counted

# A mean loss over the last DIVERGED_WINDOW steps this many times ln(classes) (a guess's loss)
# means the run has blown up; one noisy batch of a tiny set does not stop it.
DIVERGED_LOSS_FACTOR = 5.0
DIVERGED_WINDOW = 10


class TrainingDiverged(RetrieveError):
    """The loss became non-finite or exploded; the run stopped without writing bad weights."""


class DivergenceWatch:
    """The mean of the last ``DIVERGED_WINDOW`` losses against ``DIVERGED_LOSS_FACTOR`` times a
    guess's loss, ln(classes); a non-finite loss at once."""

    def __init__(self, n_classes: int) -> None:
        self.guess = max(math.log(max(n_classes, 2)), 1.0)
        self.limit = DIVERGED_LOSS_FACTOR * self.guess
        self.recent: list[float] = []

    @property
    def mean(self) -> float:
        return sum(self.recent) / max(len(self.recent), 1)

    def diverged(self, loss: float) -> bool:
        self.recent = [*self.recent[1 - DIVERGED_WINDOW :], loss]
        return not math.isfinite(loss) or self.mean > self.limit

    def error(self, where: str, kept: str | None) -> TrainingDiverged:
        said = f"{kept} weights" if kept else "no checkpoint written"
        return TrainingDiverged(
            f"training diverged at {where} (mean loss {self.mean:.3g}, a guess scores "
            f"{self.guess:.2f}); {said}; try a smaller --lr"
        )


class FrozenWeights:
    """What ``save_checkpoint`` reads of a model (its args and a state dict), for weights that
    are not the live model's: the best epoch's."""

    def __init__(self, args: Any, state: dict[str, torch.Tensor]) -> None:
        self.args, self._state = args, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def selection_score(row: dict[str, Any], select: str) -> float:
    """Higher is better: fc7 retrieval mAP, or top-1 accuracy (also where no mAP was measured)."""
    if select == "map" and "map" in row:
        return float(row["map"])
    return 1.0 - float(row["top1_error"])


def describe_epoch(row: dict[str, Any], val_name: str = "val") -> str:
    """One metrics row as the line a user reads."""
    return (
        f"epoch {row['epoch']}/{row['epochs']}: train loss {row['train_loss']:.4f}, "
        f"{val_name} top-1 error {100 * row['top1_error']:.2f}%, "
        + (f"top-5 error {100 * row['top5_error']:.2f}%, " if "top5_error" in row else "")
        + (
            f"fc7 precision@{RETRIEVAL_K} {row[f'precision@{RETRIEVAL_K}']:.3f}, "
            f"mAP {row['map']:.3f}, "
            if "map" in row
            else ""
        )
        + f"{row['seconds']:.0f} s, {row['images_per_second']:.0f} images/s"
    )


def describe_start(
    recipe: Recipe, data: DataSplits, steps_per_epoch: int, device: torch.device, plan: str = ""
) -> str:
    """What a run is about to do, as the line a user reads (with the time plan, if any)."""
    variant = recipe.arch + (" with batch norm" if recipe.batch_norm else "")
    variant += f", {recipe.groups} groups" if recipe.groups > 1 else ""
    plan = f"{plan}\n" if plan else ""
    return (
        f"{plan}training {variant} AlexNet at {recipe.image_size} px on {len(data.train)} "
        f"images ({len(data.classes)} classes, {data.channels} channel(s)), validating on "
        f"{len(data.val)} {data.val_name} images; {recipe.name} recipe, "
        f"{counted(recipe.epochs, 'epoch')} of {steps_per_epoch} steps in batches of "
        f"{recipe.batch_size} ({recipe.steps} steps) on {device}"
    )
