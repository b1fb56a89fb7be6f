"""Training and evaluation data sets: labelled images as uint8 squares, in batches.

Two layouts are read as they are, with no conversion step:

- an ImageFolder tree, ``DATA/train/CLASS/*`` and ``DATA/val/CLASS/*``, or one ``DATA/CLASS/*``
  folder split into train and val by a seeded, stratified ``val_fraction``;
- the four MNIST-style idx files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``), as
  Fashion-MNIST ships them: a 1-channel data set held in memory.

Every image becomes an ``R x R`` uint8 square, the paper's "shorter side to 256, central 256 x 256
patch" (section 2) at ``R = resize_for(image_size)``; crops, flips and colour work happen later on
whole batches (``augment.py``). Small data sets are decoded once into memory (two CPU cores
cannot afford to decode JPEGs every epoch); larger ones are decoded in DataLoader workers each
epoch. A file that cannot be decoded is skipped with a warning, never a crash.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from .augment import resize_batch
from .errors import DataError, ImageReadError
from .files import find_images
from .images import load_image

log = logging.getLogger(__name__)

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC = 2051, 2049
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DEFAULT_VAL_FRACTION = 0.1


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(cores or 1, 8))


class ImageSet:
    """Labelled images that yield uint8 ``N x C x side x side`` batches in a given order."""

    classes: list[str]
    labels: torch.Tensor  # int64 (N,)
    channels: int

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batches(
        self, order: torch.Tensor, batch_size: int, side: int, *, start: int = 0, workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def nbytes(self, side: int) -> int:
        return len(self) * self.channels * side * side

    def subset(self, indices: torch.Tensor) -> ImageSet:
        raise NotImplementedError

    def in_memory(self, side: int, workers: int = 0) -> TensorImages:
        raise NotImplementedError


class TensorImages(ImageSet):
    """Images already decoded: a uint8 ``N x C x H x H`` tensor, resized per batch as needed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != labels.numel():
            raise ValueError("images must be uint8 N x C x H x W with one label each")
        self.images, self.labels, self.classes = images, labels.long(), list(classes)
        self.channels = int(images.shape[1])

    def batches(
        self, order: torch.Tensor, batch_size: int, side: int, *, start: int = 0, workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(start * batch_size, len(order), batch_size):
            index = order[first : first + batch_size]
            yield resize_batch(self.images[index], side), self.labels[index]

    def subset(self, indices: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[indices], self.labels[indices], self.classes)

    def in_memory(self, side: int, workers: int = 0) -> TensorImages:
        return self


def decode_square(path: str, mode: str, side: int) -> torch.Tensor:
    """One file as a ``C x side x side`` uint8 square: shorter side to ``side``, central patch."""
    image = load_image(path, mode=mode, draft_size=side)
    image = TF.resize(image, [side], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, [side]))


class _DecodeFiles(Dataset):
    """Worker side: decode one file; a bad file comes back as its error text, not an exception."""

    def __init__(self, paths: Sequence[str], mode: str, side: int) -> None:
        self.paths, self.mode, self.side = paths, mode, side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, decode_square(self.paths[i], self.mode, self.side), ""
        except ImageReadError as exc:
            return i, None, str(exc)


def _collate(items: list) -> list:
    return items


class FileImages(ImageSet):
    """Image files with labels, decoded on demand in DataLoader workers."""

    def __init__(
        self, paths: Sequence[str], labels: torch.Tensor, classes: list[str], channels: int
    ) -> None:
        self.paths, self.labels, self.classes = [str(p) for p in paths], labels.long(), classes
        self.channels = channels
        self._warned: set[str] = set()

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def _decoded(
        self, order: Sequence[int], batch_size: int, side: int, workers: int
    ) -> Iterator[tuple[list[int], torch.Tensor | None]]:
        """(positions in ``order`` that decoded, their stacked pixels) per batch of ``order``."""
        paths = [self.paths[i] for i in order]
        loader = DataLoader(
            _DecodeFiles(paths, self.mode, side),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers else None,
        )
        for items in loader:
            good, pixels = [], []
            for i, tensor, error in items:
                if tensor is None:
                    if paths[i] not in self._warned:
                        self._warned.add(paths[i])
                        log.warning("skipping %s", error)
                    continue
                good.append(i)
                pixels.append(tensor)
            yield good, (torch.stack(pixels) if pixels else None)

    def batches(
        self, order: torch.Tensor, batch_size: int, side: int, *, start: int = 0, workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rest = order[start * batch_size :].tolist()
        for good, pixels in self._decoded(rest, batch_size, side, workers):
            if pixels is not None:
                yield pixels, self.labels[[rest[i] for i in good]]

    def subset(self, indices: torch.Tensor) -> FileImages:
        keep = indices.tolist()
        return FileImages(
            [self.paths[i] for i in keep], self.labels[indices], self.classes, self.channels
        )

    def in_memory(self, side: int, workers: int = 0) -> TensorImages:
        """Decode every file once (bad ones dropped with a warning) into a uint8 tensor."""
        images = torch.empty((len(self), self.channels, side, side), dtype=torch.uint8)
        keep: list[int] = []
        with tqdm(total=len(self), desc="decoding", unit="img", leave=False, disable=None) as bar:
            for good, pixels in self._decoded(range(len(self)), 256, side, workers):
                if pixels is not None:
                    images[len(keep) : len(keep) + len(good)] = pixels
                    keep.extend(good)
                bar.update(min(256, bar.total - bar.n))
        if not keep:
            raise DataError(f"none of the {len(self)} images could be decoded")
        if len(keep) < len(self):
            log.warning("%d of %d images could not be decoded", len(self) - len(keep), len(self))
        return TensorImages(images[: len(keep)], self.labels[keep], self.classes)


@dataclass
class DataSplits:
    """A training set, its validation set and what describes them."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    channels: int
    source: str  # "idx" or "folder"
    val_name: str = "val"


# --- Fashion-MNIST's idx files -----------------------------------------------------------------


def _find_idx(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    return all(_find_idx(Path(folder), stem) for stem in IDX_NAMES.values())


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """An idx file (gzipped or not) as a uint8 tensor; refuses a wrong header or a short file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    ndim = magic - 2048
    if len(data) < 4 + 4 * ndim or struct.unpack(">i", data[:4])[0] != magic:
        raise DataError(f"{path} is not an idx file with magic {magic}")
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = 1
    for n in shape:
        expected *= n
    if len(data) - offset != expected:
        raise DataError(f"{path}: header says {shape}, but holds {len(data) - offset} bytes")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape)


def _idx_classes(folder: Path) -> list[str]:
    listed = folder / "classes.txt"
    if listed.is_file():
        return [line.strip() for line in listed.read_text().splitlines() if line.strip()]
    # torchvision's downloader puts the files in FashionMNIST/raw, hence the whole path.
    if "fashion" in str(folder.resolve()).lower():
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(10)]


def load_idx_split(folder: Path, split: str) -> TensorImages:
    """``split`` "train" or "test" of an idx folder, as 1-channel uint8 images in memory."""
    prefix = "train" if split == "train" else "test"
    images_path = _find_idx(folder, IDX_NAMES[f"{prefix}_images"])
    labels_path = _find_idx(folder, IDX_NAMES[f"{prefix}_labels"])
    if images_path is None or labels_path is None:
        raise DataError(f"{folder}: no {prefix} idx image and label files")
    images = read_idx(images_path, IDX_IMAGE_MAGIC)
    labels = read_idx(labels_path, IDX_LABEL_MAGIC).long()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {prefix} images but {labels.shape[0]} labels")
    classes = _idx_classes(folder)
    if int(labels.max()) >= len(classes):
        raise DataError(f"{folder}: label {int(labels.max())} but only {len(classes)} classes")
    return TensorImages(images.unsqueeze(1), labels, classes)


# --- ImageFolder trees --------------------------------------------------------------------------


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
        found, problems = find_images(d)
        for problem in problems:
            log.warning("skipping %s", problem)
        paths.extend(str(p) for p in found)
        labels.extend([position[d.name]] * len(found))
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
