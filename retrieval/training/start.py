"""Where a fine-tuning run starts: torchvision's ImageNet weights, or any AlexNet checkpoint this
project writes (or a plain torchvision AlexNet state dict), whatever classes it was trained on.

The features and the hidden FC layers (fc6, fc7) are kept; the last layer is new, sized for this
folder's classes. The starting point is recorded in the checkpoint (``started_from``), and from
there in the manifest of an index built with it, so ``retrieve info`` says what a model grew from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import WeightsError
from retrieval.model.alexnet import AlexNet, ModelArgs
from retrieval.model.preprocess import Preprocessing
from retrieval.model.weights import GREY_MEAN, GREY_STD, load_model

# A start's class names are recorded up to this many (ImageNet's 1,000 would swell every
# manifest built from the checkpoint; their number is always recorded).
RECORDED_CLASSES = 100


@dataclass
class StartingPoint:
    """A pretrained network's weights and what they expect (architecture, preprocessing)."""

    source: str  # "imagenet" or the checkpoint's absolute path
    args: ModelArgs
    state: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    sha256: str
    classes: list[str] | None

    def record(self) -> dict[str, Any]:
        """What the checkpoint keeps of it (plain data, so ``weights_only`` loading works)."""
        named = self.classes and len(self.classes) <= RECORDED_CLASSES
        return {
            "source": self.source,
            "sha256": self.sha256,
            "arch": self.args.to_dict(),
            "num_classes": self.args.num_classes,
            "classes": list(self.classes) if named else None,
        }

    def mean_std(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The statistics the pretrained weights were trained with, for ``channels`` inputs
        (a colour start on grey data: the grey mean and std of ImageNet, as conv1 is summed)."""
        prep = self.preprocessing
        if prep.channels == channels:
            return tuple(prep.mean), tuple(prep.std)
        if channels == 1:
            return GREY_MEAN, GREY_STD
        return (float(sum(prep.mean)) / len(prep.mean),) * 3, (
            float(sum(prep.std)) / len(prep.std),
        ) * 3


def load_start(spec: str | Path) -> StartingPoint:
    """``"imagenet"`` or a weights file, refused with one line if it is neither."""
    text = str(spec)
    if text.startswith("random"):
        raise WeightsError("--finetune random: fine-tuning needs trained weights (or train anew)")
    loaded = load_model(text if text == "imagenet" else Path(text))
    return StartingPoint(
        source=loaded.source if text == "imagenet" else os.path.abspath(text),
        args=loaded.args,
        state={k: v.detach().clone() for k, v in loaded.model.state_dict().items()},
        preprocessing=loaded.preprocessing,
        sha256=loaded.sha256,
        classes=loaded.classes,
    )


def _variant(arch: str, batch_norm: bool, groups: int) -> str:
    flags = (" --batch-norm" if batch_norm else "") + (f" --groups {groups}" if groups > 1 else "")
    return f"--arch {arch}{flags}"


def check_fits(start: StartingPoint, args: ModelArgs) -> None:
    """One line when the run's architecture is not the starting point's."""
    theirs = (start.args.arch, start.args.batch_norm, start.args.groups)
    ours = (args.arch, args.batch_norm, args.groups)
    if theirs != ours:
        raise WeightsError(
            f"--finetune {start.source} is a {_variant(*theirs)} AlexNet, this run trains "
            f"{_variant(*ours)}: train with {_variant(*theirs)}"
        )


def load_into(model: AlexNet, start: StartingPoint, channels: int) -> None:
    """Copy every layer but the last into ``model`` (conv1 summed or spread for another number
    of channels: grey images see the same value in R, G and B)."""
    check_fits(start, model.args)
    last = f"classifier.{len(model.classifier) - 1}."  # the head (with batch norm not .6)
    head = {k for k in model.state_dict() if k.startswith(last)}
    state = {k: v for k, v in start.state.items() if not k.startswith(last)}
    conv1 = state["features.0.weight"]
    if conv1.shape[1] != channels:
        summed = conv1.sum(dim=1, keepdim=True)
        state["features.0.weight"] = (
            summed if channels == 1 else (summed / channels).repeat(1, channels, 1, 1)
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != head:
        raise WeightsError(
            f"--finetune {start.source} does not fit: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
