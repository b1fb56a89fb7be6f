"""How long to train: a budget in optimizer steps that fits the data, or a wall-clock budget.

The paper's "90 epochs" is a budget for 1.2 million images. A user's folder of a few hundred
images gets a few steps per epoch, so 90 epochs of batches of 128 are ~400 updates and the
network never leaves chance (measured: 5 classes x 110 images at 64 px, loss stuck at ln 5). The
budget is therefore set in steps: small sets get smaller batches (more steps per epoch) and at
least ``MIN_STEPS`` updates, large sets ``BASE_EPOCHS`` passes, never more than ``MAX_EPOCHS``
passes of a tiny set (which would only memorise it).

``--time-budget`` generalises what the demo does for Fashion-MNIST: it times a few training
steps on this device and picks the image size and the number of steps that fit. Those steps are
whole passes over the data when some number of passes is within 10% of them, else passes over
a stratified subset sized to fit, so a short budget on a large set is kept (before, it floored at
one pass: 60,000 images in 3 minutes took 4-7) and a budget between two pass counts is used.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from retrieval.errors import RetrieveError
from retrieval.model.alexnet import AlexNet
from retrieval.training.recipes import Recipe
from retrieval.units import counted

log = logging.getLogger(__name__)

MIN_STEPS = 1000  # the least a from-scratch run gets (the 5 x 110 folder learns in ~1,000)
BASE_EPOCHS = 30  # large sets: passes over the data
MAX_EPOCHS = 100  # tiny sets: at most this many passes, however few steps that is
MIN_BATCH, MAX_BATCH = 16, 128  # 128: the paper's batch (section 5)
STEPS_PER_EPOCH_AIM = 16  # a small set's batch is chosen to give about this many steps
WARMUP_SHARE, MAX_WARMUP = 0.05, 500  # the paper recipe's linear warm-up
# Share of a time budget left for validation, retrieval checks and checkpoints each epoch.
EVAL_SHARE = 0.25
TOLERANCE = 0.1  # --time-budget: whole passes over all the data if within 10% of what fits
# Image sizes --time-budget tries, largest first; cifar has its own 32 px.
CPU_SIZES, GPU_SIZES = (128, 96, 64), (224, 160, 128, 96, 64)


def default_batch_size(n_train: int) -> int:
    """The power of two nearest ``n_train / 16``, within 16..128: 550 images -> 32."""
    if n_train <= 0:
        return MIN_BATCH
    nearest = 2 ** round(math.log2(max(n_train / STEPS_PER_EPOCH_AIM, 1)))
    return int(min(max(nearest, MIN_BATCH), MAX_BATCH))


def default_steps(n_train: int, batch_size: int) -> int:
    """At least MIN_STEPS and BASE_EPOCHS passes, at most MAX_EPOCHS passes."""
    per_epoch = max(math.ceil(n_train / batch_size), 1)
    return min(max(MIN_STEPS, BASE_EPOCHS * per_epoch), MAX_EPOCHS * per_epoch)


def resolve_budget(recipe: Recipe, n_train: int) -> Recipe:
    """The recipe with batch size, epochs, steps and warm-up filled in for ``n_train`` images."""
    batch = recipe.batch_size or default_batch_size(n_train)
    per_epoch = max(math.ceil(n_train / batch), 1)
    if recipe.epochs is not None:
        epochs = recipe.epochs
    else:
        steps = recipe.steps or default_steps(n_train, batch)
        epochs = max(1, round(steps / per_epoch))
    total = epochs * per_epoch
    warmup = recipe.warmup_steps
    if warmup is None:
        warmup = min(MAX_WARMUP, max(1, round(WARMUP_SHARE * total)))
        warmup = warmup if recipe.name == "paper" else 0
    return replace(recipe, batch_size=batch, epochs=epochs, steps=total, warmup_steps=warmup)


@dataclass(frozen=True)
class TimePlan:
    """What ``--time-budget`` chose, and why."""

    recipe: Recipe
    seconds_per_step: float
    budget_seconds: float

    def describe(self, device: torch.device) -> str:
        r = self.recipe
        subset = f" of a stratified {r.subset}-image subset" if r.subset else ""
        return (
            f"time budget {self.budget_seconds:.0f} s on {device}: {r.image_size}-px input, "
            f"{r.name} recipe, {r.steps} steps in batches of {r.batch_size} "
            f"({counted(r.epochs, 'epoch')}{subset}; "
            f"{self.seconds_per_step:.3f} s per step measured here)"
        )


def time_steps(
    recipe: Recipe,
    image_size: int,
    batch_size: int,
    n_classes: int,
    channels: int,
    device: torch.device,
    steps: int = 3,
) -> float:
    """Seconds per training step of this network on this device, on random inputs.

    A throwaway copy of the network, one warm-up step, then the mean of ``steps``; the global
    RNG is left as found."""
    with torch.random.fork_rng(devices=[]):
        model = AlexNet(recipe.model_args(n_classes, channels)).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        x = torch.randn(batch_size, channels, image_size, image_size, device=device)
        y = torch.randint(0, n_classes, (batch_size,), device=device)
        timings = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(model.forward_folded(x), y).backward()
            if recipe.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_norm)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append(time.perf_counter() - started)
    return sum(timings[1:]) / steps


def plan_for_time(
    recipe: Recipe,
    seconds: float,
    n_train: int,
    n_classes: int,
    channels: int,
    device: torch.device,
    *,
    size_given: bool = False,
) -> TimePlan:
    """The largest image size whose default budget fits ``seconds`` (else the smallest, with as
    many steps as fit), the onecycle recipe (it anneals to the end of whatever budget it has).

    Only the smallest size is timed (a few steps of a large size would eat a short budget);
    larger ones are extrapolated by pixel count, which over-estimates them a little (the FC
    layers do not grow), and the time the probe took comes off the budget."""
    if seconds <= 0:
        raise RetrieveError("--time-budget must be positive")
    if recipe.epochs is not None or recipe.steps is not None:
        raise RetrieveError("--time-budget chooses the steps: leave out --epochs and --steps")
    recipe = replace(recipe, name="onecycle", warmup_steps=0)
    batch = recipe.batch_size or default_batch_size(n_train)
    if size_given:
        sizes: tuple[int, ...] = (recipe.image_size,)
    elif recipe.arch == "cifar":
        sizes = (32,)
    else:
        sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    started = time.perf_counter()
    smallest = sizes[-1]
    measured = time_steps(recipe, smallest, batch, n_classes, channels, device)
    train_seconds = (seconds - (time.perf_counter() - started)) * (1 - EVAL_SHARE)
    wanted = default_steps(n_train, batch)
    for size in sizes:
        per_step = measured * (size / smallest) ** 2
        fit = int(max(train_seconds, 0) / per_step)
        if fit >= min(wanted, MIN_STEPS) or size == sizes[-1]:
            sized = replace(recipe, image_size=size, batch_size=batch)
            return TimePlan(fit_steps(sized, fit, wanted, n_train), per_step, seconds)
    raise AssertionError("unreachable: the last size always returns")


def fit_steps(recipe: Recipe, fit: int, wanted: int, n_train: int) -> Recipe:
    """The recipe's budget for ``fit`` steps of time: the default's ``wanted`` steps if they
    fit; else whole passes over all the data if some number of them is within ``TOLERANCE`` of
    ``fit``; else as many passes as it takes over a stratified subset sized so they take
    ``fit`` steps (one pass of a subset when not one pass fits, as the demo does), so the time
    is neither overrun nor left unused."""
    batch = recipe.batch_size or default_batch_size(n_train)
    per_epoch = max(math.ceil(n_train / batch), 1)
    if fit >= wanted:
        return resolve_budget(replace(recipe, steps=wanted), n_train)
    fit = max(fit, 1)
    passes = math.ceil(fit / per_epoch)
    for epochs in (passes, passes - 1):
        if epochs >= 1 and abs(epochs * per_epoch - fit) <= TOLERANCE * fit:
            return resolve_budget(replace(recipe, epochs=epochs), n_train)
    subset = (fit // passes) * batch
    return resolve_budget(replace(recipe, epochs=passes, subset=subset), subset)


def epochs_that_fit(
    done: int, planned: int, seconds_per_epoch: float, left: float, budget: float
) -> int:
    """Where a ``--time-budget`` run ends, by its epochs as measured: where it was planned
    while the rest fits within ``TOLERANCE`` of the budget (a cut by one epoch for noise would
    end it before its schedule anneals), else after as many more epochs as fit in ``left``."""
    if (planned - done) * seconds_per_epoch <= left + TOLERANCE * budget:
        return planned
    return done + max(math.floor(left / seconds_per_epoch), 0)


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``1.5h`` or plain seconds, as seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise RetrieveError(
            f"--time-budget {text!r}: expected a duration such as 10m, 90s or 1h"
        ) from None
    if seconds <= 0:
        raise RetrieveError("--time-budget must be positive")
    return seconds
