"""The training loop: epochs of augmented batches, validation, checkpoints, ``--resume``.

Reproducibility is by construction: the data order of an epoch and the randomness of each step
(crops, flips, colour, dropout) are drawn from generators seeded by ``(seed, epoch, step)``. The
state after any step is then a function of the seed, the weights, the optimizer and the
scheduler alone, which is what a checkpoint holds, so ``--resume`` ends with exactly the weights
of an uninterrupted run (on the CPU; CUDA kernels are not bitwise deterministic).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from retrieval.atomic import atomic_write_text
from retrieval.devices import resolve_device
from retrieval.errors import DataError
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import save_checkpoint
from retrieval.training.augment import BatchTransform, PCAColor, resize_for
from retrieval.training.evaluate import autocast_for, validate
from retrieval.training.recipes import RECIPES, Recipe, build_model, make_recipe, make_scheduler
from retrieval.training.setup import (
    RunOptions,
    make_optimizer,
    measure_preprocessing,
    open_run_data,
    read_resume_state,
    run_workers,
)

__all__ = [
    "RECIPES",
    "Recipe",
    "TrainResult",
    "describe_epoch",
    "make_recipe",
    "train",
]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path
    metrics_log: Path
    epochs: int
    history: list[dict[str, Any]]
    finished: bool
    seconds: float

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def metrics_log_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".metrics.jsonl")


def step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + step


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, -1)))


class _Run:
    """One training run: the model, optimizer, scheduler and position, and how to save them."""

    on_epoch: Callable[[dict[str, Any]], None] | None = None

    def __init__(self, data_dir: str | Path, output: Path, recipe: Recipe, options: RunOptions):
        state = read_resume_state(output) if options.resume else None
        if state is not None:
            recipe = Recipe.from_dict(state["recipe"])  # the checkpoint's recipe wins
        self.recipe, self.options, self.output = recipe, options, output
        self.device = resolve_device(options.device)
        self.side = resize_for(recipe.image_size)
        self.data = open_run_data(data_dir, recipe, options)
        if state is not None and list(state["classes"]) != self.data.classes:
            raise DataError(f"--resume: {data_dir} has other classes than {output}")
        self.model = build_model(
            recipe, len(self.data.classes), self.data.channels, pretrained=state is None
        )
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.prep = Preprocessing.from_dict(state["preprocessing"])
            self.pca = PCAColor.from_dict(state["train_state"]["pca"])
        else:
            self.prep, self.pca = measure_preprocessing(
                recipe, self.data, self.side, run_workers(options)
            )
        self.transform = BatchTransform(
            recipe.image_size, self.prep.mean, self.prep.std, self.pca, recipe.augmentation
        )
        self.channels_last = self.device.type == "cuda"
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, recipe)
        self.steps_per_epoch = math.ceil(len(self.data.train) / recipe.batch_size)
        self.scheduler = make_scheduler(recipe, self.optimizer, self.steps_per_epoch)
        self.epoch, self.step, self.history, self.seen, self.loss_sum = 0, 0, [], 0, 0.0
        if state is not None:
            self.seen, self.loss_sum = state["train_state"]["epoch_loss"]
            self.optimizer.load_state_dict(state["train_state"]["optimizer"])
            self.scheduler.load_state_dict(state["train_state"]["scheduler"])
            self.epoch, self.step, self.history = state["epoch"], state["step"], state["metrics"]
        self.autocast = autocast_for(self.device, options.precision)
        self.metrics_path = metrics_log_path(output)
        # The log restarts from the checkpoint's history, so a resumed run never repeats a line.
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    def save(self, finished: bool = False) -> None:
        """A checkpoint; until the run finishes it also holds what ``--resume`` needs."""
        extra: dict[str, Any] = {}
        if not finished:  # the optimizer's momentum doubles the file; a finished run needs none
            extra["train_state"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "pca": self.pca.to_dict(),
                "epoch_loss": [self.seen, self.loss_sum],  # so a resumed epoch reports the same
            }
        save_checkpoint(
            self.output,
            self.model,
            self.prep,
            classes=self.data.classes,
            recipe=self.recipe.to_dict(),
            epoch=self.epoch,
            step=self.step,
            metrics=self.history,
            finished=finished,
            data={
                "source": self.data.source,
                "train": len(self.data.train),
                "val": len(self.data.val),
                "val_name": self.data.val_name,
            },
            **extra,
        )

    def train_step(self, pixels: torch.Tensor, labels: torch.Tensor) -> float:
        seed = step_seed(self.recipe.seed, self.epoch, self.step)
        torch.manual_seed(seed)  # dropout's randomness, tied to the step like the crops
        x = self.transform(pixels.to(self.device), torch.Generator().manual_seed(seed))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            loss = F.cross_entropy(self.model(x), labels.to(self.device))
        # Zeroing in place: re-allocating 230 MB of gradients every step costs ~60 ms on a CPU.
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        if self.recipe.name == "onecycle":
            self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    def run_epoch(self) -> bool:
        """Train to the end of the epoch (False: stopped early by ``max_steps``)."""
        recipe, options = self.recipe, self.options
        self.model.train()
        order = epoch_order(len(self.data.train), recipe.seed, self.epoch)
        started, images = time.perf_counter(), 0
        batches = self.data.train.batches(
            order, recipe.batch_size, self.side, start=self.step, workers=run_workers(options)
        )
        desc = f"epoch {self.epoch + 1}/{recipe.epochs}"
        with tqdm(
            total=self.steps_per_epoch,
            initial=self.step,
            desc=desc,
            unit="step",
            leave=False,
            disable=None,
        ) as bar:
            for pixels, labels in batches:
                loss = self.train_step(pixels, labels)
                images += len(labels)
                self.seen += len(labels)
                self.loss_sum += loss * len(labels)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if options.checkpoint_every and self.global_step % options.checkpoint_every == 0:
                    self.save()
                stop = options.max_steps and self.global_step >= options.max_steps
                if stop and self.step < self.steps_per_epoch:
                    self.save()
                    return False
        self.end_epoch(time.perf_counter() - started, images)
        return not (options.max_steps and self.global_step >= options.max_steps)

    def end_epoch(self, train_seconds: float, images: int) -> None:
        """Validate, step the plateau schedule, log a metrics row and save."""
        val = validate(
            self.model,
            self.data.val,
            self.transform,
            self.side,
            self.recipe.batch_size,
            self.device,
            self.options.precision,
            run_workers(self.options),
        )
        if self.recipe.name != "onecycle":
            self.scheduler.step(val["top1_error"])
        row = {
            "epoch": self.epoch + 1,
            "train_loss": self.loss_sum / max(self.seen, 1),
            **val,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": train_seconds + val["val_seconds"],
            "images_per_second": images / max(train_seconds, 1e-9),
            "epochs": self.recipe.epochs,
        }
        self.history.append(row)
        self.epoch, self.step, self.seen, self.loss_sum = self.epoch + 1, 0, 0, 0.0
        self.save(finished=self.epoch >= self.recipe.epochs)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info("%s", describe_epoch(row, self.data.val_name))
        if self.on_epoch is not None:
            self.on_epoch(row)


def describe_epoch(row: dict[str, Any], val_name: str = "val") -> str:
    """One metrics row as the line a user reads."""
    return (
        f"epoch {row['epoch']}/{row['epochs']}: train loss {row['train_loss']:.4f}, "
        f"{val_name} top-1 error {100 * row['top1_error']:.2f}%, "
        f"top-5 error {100 * row['top5_error']:.2f}%, "
        f"{row['seconds']:.0f} s, {row['images_per_second']:.0f} images/s"
    )


def train(
    data_dir: str | Path,
    output: str | Path,
    recipe: Recipe,
    options: RunOptions = RunOptions(),
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train AlexNet on ``data_dir`` and write a self-describing checkpoint to ``output``.

    With ``options.resume`` the run saved in ``output`` continues with its own recipe;
    ``on_epoch`` receives each epoch's metrics row (what the JSON-lines log gets)."""
    started = time.perf_counter()
    run = _Run(data_dir, Path(output), recipe, options)
    run.on_epoch = on_epoch
    data = run.data
    log.info(
        "training %s on %d images (%d classes, %d channel(s)), validating on %d %s images; "
        "%d steps per epoch on %s",
        run.recipe.arch,
        len(data.train),
        len(data.classes),
        data.channels,
        len(data.val),
        data.val_name,
        run.steps_per_epoch,
        run.device,
    )
    while run.epoch < run.recipe.epochs:
        if not run.run_epoch():
            log.info("stopped after %d steps (--max-steps); --resume continues", run.global_step)
            break
    finished = run.epoch >= run.recipe.epochs
    return TrainResult(
        Path(output),
        run.metrics_path,
        run.epoch,
        list(run.history),
        finished,
        time.perf_counter() - started,
    )
