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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from retrieval.atomic import atomic_write_text
from retrieval.devices import resolve_device
from retrieval.errors import DataError
from retrieval.images.class_names import names_for
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import save_checkpoint
from retrieval.progress import silent
from retrieval.training.augment import BatchTransform, PCAColor, resize_for
from retrieval.training.budget import epochs_that_fit, plan_for_time, resolve_budget
from retrieval.training.monitor import (
    DivergenceWatch,
    FrozenWeights,
    TrainingDiverged,
    describe_epoch,
    describe_start,
    selection_score,
)
from retrieval.training.prepare import (
    RunOptions,
    cache_run_data,
    make_optimizer,
    measure_preprocessing,
    open_run_data,
    read_resume_state,
    retrieval_sample,
    run_workers,
)
from retrieval.training.recipes import (
    RECIPES,
    Recipe,
    build_model,
    make_recipe,
    make_scheduler,
    scale_to_unit,
    warmup_factor,
)
from retrieval.training.start import check_fits, load_start
from retrieval.training.validation import autocast_for, validate
from retrieval.units import counted

__all__ = [
    "RECIPES",
    "Recipe",
    "TrainResult",
    "TrainingDiverged",
    "describe_epoch",
    "make_recipe",
    "train",
]

log = logging.getLogger(__name__)

# The resume checkpoint is written at the end of an epoch once a minute at most (and always at
# the end of the run): on a small folder an epoch is a second, and writing the weights with the
# optimizer's state (about 700 MB) took longer than training it (1.3 s of 2.3 s per epoch,
# 22 images at 64 px on 2 cores). A killed run loses at most this much work.
SAVE_SECONDS = 60.0


@dataclass
class TrainResult:
    checkpoint: Path
    metrics_log: Path
    epochs: int
    history: list[dict[str, Any]]
    finished: bool
    seconds: float
    recipe: Recipe | None = None
    best: dict[str, Any] | None = None
    plan: str = ""

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
        started = time.perf_counter()
        state = read_resume_state(output) if options.resume else None
        # --time-budget counts from here (opening the data, the probe, the epochs, the saves)
        self.budget = options.time_budget if state is None else None
        self.deadline = started + self.budget if self.budget else None
        if state is not None:
            recipe = Recipe.from_dict(state["recipe"])  # the checkpoint's recipe wins
        self.options, self.output = options, output
        self.device = resolve_device(options.device)
        # The fine-tuning start is read (and its architecture checked) before any data is.
        start = load_start(recipe.finetune) if recipe.finetune and state is None else None
        if start is not None:
            check_fits(start, recipe.model_args(1, start.args.in_channels))
        self.started_from = start.record() if start else (state or {}).get("started_from")
        self.data = open_run_data(data_dir, recipe)
        n_classes, channels = len(self.data.classes), self.data.channels
        if state is not None and list(state["classes"]) != self.data.classes:
            raise DataError(f"--resume: {data_dir} has other classes than {output}")
        # Readable names of WordNet-id class folders (a words.txt beside the data), kept with
        # the weights so evaluate and the figures can name the classes without the data.
        self.class_names = names_for(self.data.classes, data_dir) or None
        self.plan = ""
        if state is None and options.time_budget:
            plan = plan_for_time(
                recipe,
                options.time_budget,
                len(self.data.train),
                n_classes,
                channels,
                self.device,
                size_given=options.image_size_given,
            )
            recipe, self.plan = plan.recipe, plan.describe(self.device)
            log.info("%s", self.plan)
            if recipe.subset and recipe.subset < len(self.data.train):
                self.data = open_run_data(data_dir, recipe)  # the plan's stratified subset
        self.recipe = recipe = resolve_budget(recipe, len(self.data.train))
        self.side = resize_for(recipe.image_size)
        cache_run_data(self.data, recipe.image_size, options)
        self.database = retrieval_sample(self.data, recipe.seed, options.retrieval_images)
        self.model = build_model(recipe, n_classes, channels, pretrained=state is None, start=start)
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        if state is not None:
            train_state = state["train_state"]
            self.model.load_state_dict(train_state.get("model", state["model"]))
            if state.get("best"):
                self.best, self.best_state = state["best"], state["model"]
            self.prep = Preprocessing.from_dict(state["preprocessing"])
            self.pca = PCAColor.from_dict(train_state["pca"])
        else:
            self.prep, self.pca = measure_preprocessing(
                recipe, self.data, self.side, run_workers(options), start
            )
        del start  # 240 MB of weights, now in the model
        self.transform = BatchTransform(
            recipe.image_size, self.prep.mean, self.prep.std, self.pca, recipe.augmentation
        )
        if state is None and recipe.init == "lsuv" and not recipe.finetune:
            scale_to_unit(self.model, self.init_batch())
        self.channels_last = self.device.type == "cuda"
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, recipe)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.steps_per_epoch = math.ceil(len(self.data.train) / recipe.batch_size)
        self.scheduler = make_scheduler(recipe, self.optimizer, self.steps_per_epoch)
        self.epoch, self.step, self.history, self.seen, self.loss_sum = 0, 0, [], 0, 0.0
        self.saved_at = self.epochs_started = time.perf_counter()  # nothing to lose yet
        if state is not None:
            self.seen, self.loss_sum = state["train_state"]["epoch_loss"]
            self.optimizer.load_state_dict(state["train_state"]["optimizer"])
            self.scheduler.load_state_dict(state["train_state"]["scheduler"])
            self.epoch, self.step, self.history = state["epoch"], state["step"], state["metrics"]
        self.autocast = autocast_for(self.device, options.precision)
        self.watch = DivergenceWatch(n_classes)
        self.metrics_path = metrics_log_path(output)
        # The log restarts from the checkpoint's history, so a resumed run never repeats a line.
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    def init_batch(self, size: int = 256) -> torch.Tensor:
        """Centre crops of a seeded sample of training images, for ``scale_to_unit``."""
        order = epoch_order(len(self.data.train), self.recipe.seed, -1)[:size]
        pixels = torch.cat([p for p, _ in self.data.train.batches(order, size, self.side)])
        return self.transform(pixels, train=False)

    def current_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, finished: bool = False) -> None:
        """A checkpoint of the best epoch so far (by ``recipe.select``); until the run finishes
        it also holds what ``--resume`` needs, the latest weights among them."""
        extra: dict[str, Any] = {}
        latest = self.current_state()
        if not finished:  # the optimizer's momentum doubles the file; a finished run needs none
            extra["train_state"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "pca": self.pca.to_dict(),
                "epoch_loss": [self.seen, self.loss_sum],  # so a resumed epoch reports the same
            }
            at_best = self.best is not None and (self.best["epoch"], self.step) == (self.epoch, 0)
            if self.best_state is not None and not at_best:
                extra["train_state"]["model"] = latest
        weights = self.best_state if self.best_state is not None else latest
        save_checkpoint(
            self.output,
            FrozenWeights(self.model.args, weights),  # type: ignore[arg-type]
            self.prep,
            classes=self.data.classes,
            recipe=self.recipe.to_dict(),
            epoch=self.epoch,
            step=self.step,
            metrics=self.history,
            best=self.best,
            finished=finished,
            started_from=self.started_from,
            class_names=self.class_names,
            data={
                "source": self.data.source,
                "train": len(self.data.train),
                "val": len(self.data.val),
                "val_name": self.data.val_name,
            },
            **extra,
        )
        self.saved_at = time.perf_counter()

    def keep_to_budget(self) -> None:
        """``--time-budget``: end the run at the last epoch that still fits, by the epochs
        measured so far (training, validation and saves), not the plan's estimate: the plan
        times a few steps on random inputs, and on a small folder the per-epoch costs it can
        only guess are most of the time. The one-cycle schedule is redrawn to anneal by the new
        end (from the step it is at, so the learning rate steps down)."""
        if self.deadline is None or self.epoch >= self.recipe.epochs:
            return  # (a resumed run has no deadline: the time before it is unknown)
        now = time.perf_counter()
        per_epoch = (now - self.epochs_started) / self.epoch
        left = self.deadline - now
        epochs = epochs_that_fit(self.epoch, self.recipe.epochs, per_epoch, left, self.budget)
        if epochs == self.recipe.epochs:
            return
        cut = (
            f"{counted(epochs, 'epoch')} fit, not {self.recipe.epochs} ({per_epoch:.2f} s per "
            "epoch with validation and saves, measured here)"
        )
        log.info("time budget: %s", cut)
        self.plan = f"{self.plan}; then {cut}" if self.plan else cut
        self.recipe = replace(self.recipe, epochs=epochs, steps=epochs * self.steps_per_epoch)
        if epochs > self.epoch and self.recipe.name == "onecycle":
            self.scheduler = make_scheduler(
                self.recipe, self.optimizer, self.steps_per_epoch, start_step=self.global_step
            )

    def train_step(self, pixels: torch.Tensor, labels: torch.Tensor) -> float:
        seed = step_seed(self.recipe.seed, self.epoch, self.step)
        torch.manual_seed(seed)  # dropout's randomness, tied to the step like the crops
        x = self.transform(pixels.to(self.device), torch.Generator().manual_seed(seed))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.recipe.name == "paper" and self.global_step <= (self.recipe.warmup_steps or 0):
            lr = self.recipe.lr * warmup_factor(self.recipe, self.global_step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        with self.autocast:
            loss = F.cross_entropy(self.model.forward_folded(x), labels.to(self.device))
        value = float(loss.detach())
        if self.watch.diverged(value):
            where = f"epoch {self.epoch + 1}, step {self.step + 1}"
            kept = f"{self.output} keeps epoch {self.best['epoch']}'s" if self.best else None
            raise self.watch.error(where, kept)
        # Zeroing in place: re-allocating 230 MB of gradients every step costs ~60 ms on a CPU.
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if self.recipe.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.clip_norm, foreach=True)
        self.optimizer.step()
        if self.recipe.name == "onecycle":
            self.scheduler.step()
        self.step += 1
        return value

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
        report = options.progress or silent
        report(desc, self.step, self.steps_per_epoch)
        for pixels, labels in batches:
            if len(labels) < 2 and self.recipe.batch_norm:
                continue  # batch norm cannot train on one image: the epoch's last, if any
            loss = self.train_step(pixels, labels)
            images += len(labels)
            self.seen += len(labels)
            self.loss_sum += loss * len(labels)
            report(f"{desc} loss {loss:.3f}", self.step, self.steps_per_epoch)
            if options.checkpoint_every and self.global_step % options.checkpoint_every == 0:
                self.save()
            stop = options.max_steps and self.global_step >= options.max_steps
            if stop and self.step < self.steps_per_epoch:
                self.save()
                return False
        self.end_epoch(time.perf_counter() - started, images)
        return not (options.max_steps and self.global_step >= options.max_steps)

    def end_epoch(self, train_seconds: float, images: int) -> None:
        """Validate, step the plateau schedule, log a metrics row, keep the best and save."""
        val = validate(
            self.model,
            self.data.val,
            self.transform,
            self.side,
            self.recipe.batch_size,
            self.device,
            self.options.precision,
            run_workers(self.options),
            database=self.database,
            progress=self.options.progress,
        )
        if self.recipe.name != "onecycle" and self.global_step > (self.recipe.warmup_steps or 0):
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
        score = selection_score(row, self.recipe.select)
        if self.best is None or score > self.best["score"]:
            self.best = {"epoch": row["epoch"], "select": self.recipe.select, "score": score}
            self.best_state = self.current_state()
        row["kept_epoch"] = self.best["epoch"]  # so a log alone can mark it (figures/curves.py)
        self.keep_to_budget()
        row["epochs"] = self.recipe.epochs  # the log line says the end as it now stands
        finished = self.epoch >= self.recipe.epochs
        if finished or time.perf_counter() - self.saved_at >= SAVE_SECONDS:
            self.save(finished=finished)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info("%s", describe_epoch(row, self.data.val_name))
        if self.on_epoch is not None:
            self.on_epoch(row)


def train(
    data_dir: str | Path,
    output: str | Path,
    recipe: Recipe,
    options: RunOptions = RunOptions(),
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train AlexNet on ``data_dir`` and write a self-describing checkpoint to ``output``.

    With ``options.resume`` the run saved in ``output`` continues with its own recipe;
    ``on_epoch`` receives each epoch's metrics row (what the JSON-lines log gets), ``on_start``
    the line that says what the run chose (budget, batch size, steps)."""
    started = time.perf_counter()
    device = resolve_device(options.device)
    # Training seeds the global RNG every step (dropout); the caller's RNG is left as found.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        run = _Run(data_dir, Path(output), recipe, options)
        run.on_epoch = on_epoch
        started_line = describe_start(
            run.recipe, run.data, run.steps_per_epoch, run.device, run.plan
        )
        log.info("%s", started_line)
        if on_start is not None:
            on_start(started_line)
        while run.epoch < run.recipe.epochs:
            if not run.run_epoch():
                steps = run.global_step
                log.info("stopped after %d steps (--max-steps); --resume continues", steps)
                break
    finished = run.epoch >= run.recipe.epochs
    return TrainResult(
        Path(output),
        run.metrics_path,
        run.epoch,
        list(run.history),
        finished,
        time.perf_counter() - started,
        recipe=run.recipe,
        best=run.best,
        plan=run.plan,
    )
