"""Labelled images as uint8 ``N x C x side x side`` batches: held in memory, or decoded from files.

Every image becomes an ``R x R`` uint8 square, the paper's "shorter side to 256, central 256 x 256
patch" (section 2) at ``R = resize_for(image_size)``; crops, flips and colour work happen later on
whole batches (``augment.py``). Small data sets are decoded once into memory (two CPU cores
cannot afford to decode JPEGs every epoch); larger ones are decoded in DataLoader workers each
epoch. A file that cannot be decoded is skipped with a warning, never a crash. Which files and
labels make up a data set is ``data.py``'s job; this module only turns them into batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from retrieval.devices import usable_cores
from retrieval.errors import DataError, ImageReadError
from retrieval.images.decode import load_image
from retrieval.progress import Progress, silent
from retrieval.training.augment import resize_batch

log = logging.getLogger(__name__)


def default_workers() -> int:
    """DataLoader workers for training: one per core, at most eight."""
    return max(0, min(usable_cores(), 8))


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

    def in_memory(
        self, side: int, workers: int = 0, progress: Progress | None = None
    ) -> TensorImages:
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

    def in_memory(
        self, side: int, workers: int = 0, progress: Progress | None = None
    ) -> TensorImages:
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

    def in_memory(
        self, side: int, workers: int = 0, progress: Progress | None = None
    ) -> TensorImages:
        """Decode every file once (bad ones dropped with a warning) into a uint8 tensor."""
        images = torch.empty((len(self), self.channels, side, side), dtype=torch.uint8)
        keep: list[int] = []
        report, done = progress or silent, 0
        report("decoding", 0, len(self))
        for good, pixels in self._decoded(range(len(self)), 256, side, workers):
            if pixels is not None:
                images[len(keep) : len(keep) + len(good)] = pixels
                keep.extend(good)
            done = min(done + 256, len(self))
            report("decoding", done, len(self))
        if not keep:
            raise DataError(f"none of the {len(self)} images could be decoded")
        if len(keep) < len(self):
            log.warning("%d of %d images could not be decoded", len(self) - len(keep), len(self))
        return TensorImages(images[: len(keep)], self.labels[keep], self.classes)
