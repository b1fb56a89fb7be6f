"""What a training run starts from: its options, data, training-set statistics, optimizer,
or the state a ``--resume`` continues.

Kept apart from the loop (``train.py``) because it all happens once, before the first step: the
splits (a subset taken, folder images decoded into memory when they fit), the mean, std and
colour PCA measured on a sample of the training set (paper section 4.1), SGD as the paper sets
it up (section 5), and the checks that a checkpoint can be resumed at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import DataError, WeightsError
from retrieval.model.alexnet import AlexNet
from retrieval.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from retrieval.model.weights import GREY_MEAN, GREY_STD, read_checkpoint
from retrieval.progress import Progress
from retrieval.training.augment import PCAColor, pixel_stats, resize_for
from retrieval.training.datasets import DataSplits, open_training_data, stratified_split
from retrieval.training.imagesets import FileImages, ImageSet, default_workers
from retrieval.training.recipes import Recipe
from retrieval.training.start import StartingPoint
from retrieval.units import counted

log = logging.getLogger(__name__)

STATS_SAMPLE = 2000  # images to compute mean, std and colour PCA from


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to learn): device, workers, checkpoints, budget."""

    device: str = "auto"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on the CPU
    workers: int | None = None
    checkpoint_every: int = 0  # also save every N steps (0: at epoch ends, once a minute at most)
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    resume: bool = False
    cache_bytes: int = 4 << 30  # decode a folder data set once if it fits in this much memory
    time_budget: float | None = None  # seconds: choose image size and steps that fit (budget.py)
    retrieval_images: int = 2000  # training images each epoch's fc7 check ranks (0: no check)
    image_size_given: bool = False  # with time_budget: keep the recipe's image size
    progress: Progress | None = None  # (what, done, total) callbacks; the CLI draws the bars


def run_workers(options: RunOptions) -> int:
    return default_workers() if options.workers is None else options.workers


def measure_preprocessing(
    recipe: Recipe,
    data: DataSplits,
    side: int,
    workers: int = 0,
    start: StartingPoint | None = None,
) -> tuple[Preprocessing, PCAColor]:
    """Mean/std and colour PCA from a sample of the training set (section 4.1); a fine-tuned
    network keeps the mean and std its starting weights were trained with."""
    generator = torch.Generator().manual_seed(recipe.seed)
    pick = torch.randperm(len(data.train), generator=generator)[:STATS_SAMPLE]
    batches = data.train.batches(pick, 256, side, workers=workers)
    sample = torch.cat([pixels for pixels, _ in batches])
    stats = pixel_stats(sample, seed=recipe.seed)
    mean, std = stats.mean, stats.std
    if start is not None:  # the pretrained weights expect their own statistics
        mean, std = start.mean_std(data.channels)
    elif recipe.finetune:  # (ImageNet's, when no start is given)
        mean, std = (GREY_MEAN, GREY_STD) if data.channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    prep = Preprocessing(side, recipe.image_size, tuple(mean), tuple(std), data.channels)
    return prep, stats.pca


def make_optimizer(model: AlexNet, recipe: Recipe) -> torch.optim.SGD:
    """SGD with momentum and weight decay (paper section 5), fused where torch has it: the
    fused kernel updates AlexNet's 57M parameters in ~25 ms on a 2-core CPU instead of ~125."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": recipe.lr, "momentum": recipe.momentum, "weight_decay": recipe.weight_decay}
    try:
        return torch.optim.SGD(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
        return torch.optim.SGD(params, **kwargs)


def open_run_data(data_dir: str | Path, recipe: Recipe) -> DataSplits:
    """The splits, subset taken (file lists only: nothing decoded yet)."""
    data = open_training_data(data_dir, val_fraction=recipe.val_fraction, seed=recipe.seed)
    if len(data.classes) < 2:
        # One class is a loss of zero from the first step: nothing would be learned.
        only = f" ({data.classes[0]})" if data.classes else ""
        raise DataError(
            f"{data_dir} has one class folder{only}: training tells classes apart, so it needs "
            "at least 2 (to index without training, use --weights imagenet or random)"
        )
    if recipe.subset and recipe.subset < len(data.train):
        fraction = recipe.subset / len(data.train)
        _, keep = stratified_split(data.train.labels, fraction, recipe.seed)
        data.train = data.train.subset(keep)
    return data


def cache_run_data(data: DataSplits, image_size: int, options: RunOptions) -> None:
    """Decode folder images once into memory, at the size the run needs, when they fit."""
    side = resize_for(image_size)
    for name in ("train", "val"):
        part: ImageSet = getattr(data, name)
        if isinstance(part, FileImages) and part.nbytes(side) <= options.cache_bytes:
            log.info("decoding the %d %s images once into memory", len(part), name)
            setattr(data, name, part.in_memory(side, run_workers(options), options.progress))


def retrieval_sample(data: DataSplits, seed: int, size: int) -> ImageSet | None:
    """The training images each epoch's fc7 retrieval check ranks (all of a small set)."""
    if size <= 0:
        return None
    if len(data.train) <= size:
        return data.train
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    return data.train.subset(pick[:size].sort().values)


def refuse_to_replace(output: Path) -> None:
    """A fresh run must not write over a file already at ``output``: a checkpoint there may be
    hours of training. Says what it is and the ways on (another -o, --resume, --finetune,
    --overwrite)."""
    if not output.exists():
        return
    ways = ["write to another -o", "replace it with --overwrite"]
    try:
        state = read_checkpoint(output)
    except WeightsError:
        what = "a file that is not a checkpoint"
    else:
        epoch = state.get("epoch")
        if "train_state" in state and not state.get("finished"):
            what = f"an unfinished run's checkpoint (epoch {epoch})"
            ways.insert(0, "continue it with --resume")
        else:
            done = f" ({counted(epoch, 'epoch')})" if state.get("finished") and epoch else ""
            what = f"a {'finished run' if done else 'model'}'s checkpoint{done}"
            ways.insert(1, f"start from it with --finetune {output}")
    raise DataError(f"{output} exists: {what}; {', '.join(ways[:-1])} or {ways[-1]}")


def read_resume_state(output: Path) -> dict[str, Any]:
    if not output.exists():
        raise WeightsError(f"--resume: no checkpoint at {output} to continue from")
    state = read_checkpoint(output)
    if state.get("finished"):
        raise WeightsError(f"--resume: the run in {output} has finished already")
    if "train_state" not in state or "recipe" not in state:
        raise WeightsError(f"--resume: {output} holds no training state")
    log.info("resuming %s at epoch %d, step %d", output, state["epoch"], state["step"])
    return state
