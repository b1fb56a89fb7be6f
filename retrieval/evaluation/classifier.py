"""``retrieve evaluate DATA --weights M``: top-1 / top-5 of a checkpoint's own classifier on a
labelled folder, with one and with ten crops, accuracy per class and the confusion matrix.

It runs the training package's batched classification (``training.validation.classify``), the
same code that validates while training, so a number here and a number in a training log mean
the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.devices import resolve_device
from retrieval.figures.confusion import largest_confusions, save_confusion
from retrieval.images.class_names import display_name, names_for
from retrieval.metrics import informative_ks, topk_correct
from retrieval.model.weights import load_model
from retrieval.progress import Progress
from retrieval.training.augment import BatchTransform
from retrieval.training.datasets import open_eval_data
from retrieval.training.imagesets import default_workers
from retrieval.training.validation import classify


@dataclass
class ClassifierReport:
    """Top-k accuracy with one and with ten crops, accuracy per class and the confusion matrix
    (centre crop: ``confusion[true][predicted]`` counts images, rows in ``classes`` order)."""

    weights: str
    data: str
    images: int
    top1: float
    top5: float | None  # None with 5 classes or fewer, where every image is in its top 5
    top1_ten_crop: float | None
    top5_ten_crop: float | None
    per_class: dict[str, float]
    classes: list[str] = field(default_factory=list)
    # Readable names of WordNet-id classes: the checkpoint's, else a words.txt beside the data.
    names: dict[str, str] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    largest_confusions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def display(self, label: str, *, with_id: bool = False) -> str:
        """A class as a person reads it (``tench`` for ``n01440764``, where a name is known)."""
        return display_name(label, self.names, with_id=with_id)

    def labels(self) -> list[str]:
        """The classes as the confusion matrix's axes name them."""
        return [self.display(c) for c in self.classes]

    def draw_confusion(self, output: str | Path) -> Path:
        """The confusion matrix as a picture, the classes named on both axes."""
        labels = self.labels()
        title = f"{Path(self.weights).name} on {self.data}: top-1 {100 * self.top1:.1f}%"
        return save_confusion(np.array(self.confusion), labels, output, title)


def evaluate_classifier(
    weights: str | Path,
    data_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 128,
    ten_crop: bool = True,
    precision: str = "auto",
    workers: int | None = None,
    progress: Progress | None = None,
) -> ClassifierReport:
    """Top-1/top-5 of a checkpoint on ``data_dir`` (idx test split, ``val/``, ``test/``, or the
    folder itself), with the preprocessing the checkpoint records."""
    torch_device = resolve_device(device)
    loaded = load_model(weights, torch_device)
    prep = loaded.preprocessing
    images = open_eval_data(data_dir, loaded.classes, prep.channels)
    classes = loaded.classes or images.classes
    transform = BatchTransform(prep.crop, prep.mean, prep.std)
    n_workers = default_workers() if workers is None else workers
    kwargs = {"precision": precision, "workers": n_workers, "progress": progress}
    logits, labels = classify(
        loaded.model, images, transform, prep.resize, batch_size, torch_device, **kwargs
    )
    ks = informative_ks(logits.shape[1])
    centre = topk_correct(logits, labels, ks)
    n = max(len(labels), 1)
    ten = None
    if ten_crop:
        probs, _ = classify(
            loaded.model,
            images,
            transform,
            prep.resize,
            batch_size,
            torch_device,
            ten_crop=True,
            desc="ten crops",
            **kwargs,
        )
        ten = topk_correct(probs, labels, ks)
    predicted = logits.argmax(dim=1) if len(labels) else labels
    per_class = {}
    for index, name in enumerate(classes):
        members = labels == index
        if members.any():
            per_class[name] = float((predicted[members] == index).float().mean())
    n_classes = len(classes)
    pairs = (labels.long() * n_classes + predicted.long()).numpy()
    matrix = np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    names = loaded.class_names or names_for(classes, data_dir)
    shown = [display_name(c, names) for c in classes]
    largest = largest_confusions(matrix, shown)
    return ClassifierReport(
        weights=str(weights),
        data=str(data_dir),
        images=len(labels),
        top1=centre[1] / n,
        top5=centre[5] / n if 5 in centre else None,
        top1_ten_crop=ten[1] / n if ten else None,
        top5_ten_crop=ten[5] / n if ten and 5 in ten else None,
        per_class=per_class,
        classes=list(classes),
        names={c: n for c, n in names.items() if c in classes},
        confusion=matrix.tolist(),
        largest_confusions=largest,
    )
