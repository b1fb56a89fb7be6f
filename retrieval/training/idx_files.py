"""Fashion-MNIST's idx files: the four MNIST-style files read into a 1-channel set in memory.

The files are ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` and their
``t10k-`` test twins, as Fashion-MNIST ships them (or torchvision's downloader leaves them). They
are read as they are, with no conversion step; a wrong header or a short file is refused.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from retrieval.errors import DataError
from retrieval.training.imagesets import TensorImages

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
