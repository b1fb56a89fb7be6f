"""Training and evaluation data sets: the labelled images of a folder, split into train and val.

Two layouts are read as they are, with no conversion step:

- an ImageFolder tree, ``DATA/train/CLASS/*`` and ``DATA/val/CLASS/*``, or one ``DATA/CLASS/*``
  folder split into train and val by a seeded, stratified ``val_fraction``;
- the four MNIST-style idx files as Fashion-MNIST ships them (``idx_files.py`` reads them).

Turning the images into uint8 batches, in memory or decoded from files, is ``imagesets.py``'s job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.errors import DataError
from retrieval.images.walk import find_images
from retrieval.training.idx_files import has_idx_files, load_idx_split
from retrieval.training.imagesets import FileImages, ImageSet

log = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1


@dataclass
class DataSplits:
    """A training set, its validation set and what describes them."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    channels: int
    source: str  # "idx" or "folder"
    val_name: str = "val"


def folder_name(class_name: str) -> str:
    """A class name usable as a folder name (Fashion-MNIST has "T-shirt/top")."""
    return class_name.replace("/", "_").replace(os.sep, "_")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: Path, classes: list[str] | None, channels: int) -> FileImages:
    """``root/CLASS/**/image`` files labelled by class folder; ``classes`` fixes the order."""
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(f"{root} has no class folders (expected {root}/CLASS/image files)")
    found_in: dict[Path, list[Path]] = {}
    for d in dirs:
        found, problems = find_images(d)
        for problem in problems:
            log.warning("skipping %s", problem)
        found_in[d] = found
    empty = [d.name for d in dirs if not found_in[d]]
    if empty:  # a class with no image would only be an output no example ever asks for
        log.warning("%s: class folders without images, left out: %s", root, ", ".join(empty))
    dirs = [d for d in dirs if found_in[d]]
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    position = {folder_name(c): i for i, c in enumerate(classes)}
    position.update({c: i for i, c in enumerate(classes)})
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise DataError(f"{root}: class folders not in the model's classes: {unknown[:5]}")
    paths: list[str] = []
    labels: list[int] = []
    for d in dirs:
        paths.extend(str(p) for p in found_in[d])
        labels.extend([position[d.name]] * len(found_in[d]))
    if not paths:
        raise DataError(f"no images found under {root}")
    return FileImages(paths, torch.tensor(labels, dtype=torch.long), list(classes), channels)


def stratified_split(
    labels: torch.Tensor, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and val indices with ``val_fraction`` of every class (at least one) in val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be between 0 and 1, not {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def open_training_data(
    data_dir: str | Path,
    *,
    channels: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> DataSplits:
    """Detect the layout of ``data_dir`` and return its train and val sets.

    For idx files the val set is the t10k test split unless ``val_fraction`` asks to hold out
    part of the training split; for a single folder of classes ``val_fraction`` defaults to 0.1.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if has_idx_files(root):
        train = load_idx_split(root, "train")
        if channels == 3:
            raise DataError(f"{root} holds 1-channel idx images; a 3-channel model cannot use it")
        if val_fraction:
            train_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
            val = train.subset(val_idx)
            return DataSplits(train.subset(train_idx), val, train.classes, 1, "idx")
        return DataSplits(train, load_idx_split(root, "test"), train.classes, 1, "idx", "test")
    channels = channels or 3
    if (root / "train").is_dir():
        train = scan_folder(root / "train", None, channels)
        for name in ("val", "test"):
            if (root / name).is_dir() and not val_fraction:
                val = scan_folder(root / name, train.classes, channels)
                return DataSplits(train, val, train.classes, channels, "folder", name)
    else:
        train = scan_folder(root, None, channels)
    train_idx, val_idx = stratified_split(train.labels, val_fraction or DEFAULT_VAL_FRACTION, seed)
    return DataSplits(
        train.subset(train_idx), train.subset(val_idx), train.classes, channels, "folder"
    )


def open_eval_data(data_dir: str | Path, classes: list[str] | None, channels: int) -> ImageSet:
    """The labelled images to evaluate on: idx t10k, else ``val/`` or ``test/``, else the folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if has_idx_files(root):
        if channels != 1:
            raise DataError(f"{root} holds 1-channel idx images; this model takes {channels}")
        test = load_idx_split(root, "test")
        if classes is not None and len(classes) != len(test.classes):
            raise DataError(f"{root} has {len(test.classes)} classes, the model {len(classes)}")
        if classes is not None:
            test.classes = list(classes)
        return test
    for name in ("val", "test"):
        if (root / name).is_dir():
            return scan_folder(root / name, classes, channels)
    return scan_folder(root, classes, channels)
