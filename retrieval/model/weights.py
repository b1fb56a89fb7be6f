"""Where a model comes from: ``imagenet``, ``random`` or a file, and how checkpoints are written.

Checkpoints describe themselves (as nanoGPT's do): the architecture, the class names, the exact
preprocessing, the recipe and its metrics travel with the weights, so ``--weights model.pt`` needs
no other option. Every loaded model carries the sha256 of its weights, which an index records so
that a query with another model is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_write
from retrieval.errors import WeightsError
from retrieval.model.alexnet import AlexNet, ModelArgs, build_alexnet
from retrieval.model.identity import Identity
from retrieval.model.preprocess import IMAGENET, Preprocessing

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "retrieve-checkpoint"
CHECKPOINT_VERSION = 1
RANDOM_SEED = 0
# The mean and std of ImageNet's grey levels, for 1-channel models without their own statistics.
GREY_MEAN, GREY_STD = (0.449,), (0.226,)


@dataclass
class LoadedModel:
    """A model ready for inference, with what an index must record about it."""

    model: AlexNet
    preprocessing: Preprocessing
    sha256: str
    source: str
    classes: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def fc7_dim(self) -> int:
        return self.model.fc7_dim

    def describe(self) -> dict[str, Any]:
        """Where the model came from, as a manifest records it (``source`` is absolute, so an
        index built with ``--weights model.pt`` finds the file from any directory)."""
        record = {
            "source": self.source,
            "sha256": self.sha256,
            "arch": self.args.to_dict(),
            "layer": "fc7",
            "preprocessing": self.preprocessing.to_dict(),
        }
        if self.started_from:  # a fine-tuned checkpoint: what it grew from (`retrieve info`)
            record["started_from"] = self.started_from
        return record

    @property
    def class_names(self) -> dict[str, str]:
        """Readable names of WordNet-id classes, as training found them (``words.txt``)."""
        return dict(self.metadata.get("class_names") or {})

    @property
    def started_from(self) -> dict[str, Any] | None:
        """The weights a fine-tuned checkpoint started from (source, sha256, arch, classes)."""
        return self.metadata.get("started_from")

    def identity(
        self, precision: str = "fp32", *, reduce: str | None = None, normalize: bool = False
    ) -> Identity:
        """What fc7 of this model means, as an index records and checks it."""
        return Identity(
            weights_sha256=self.sha256,
            arch=self.args.to_dict(),
            preprocessing=self.preprocessing.to_dict(),
            dim=self.fc7_dim,
            precision=precision,
            reduce=reduce,
            normalize=normalize,
        )


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A digest of the weights themselves, the same whatever file they came in."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.numel():  # the buffer itself: a copy of 240 MB would double the time
            # reshape(-1): a 0-d tensor (batch norm's num_batches_tracked) cannot be viewed
            # as bytes, and the same weights must hash the same in any file.
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """``"imagenet"``, ``"random"`` or a path to a checkpoint or a plain AlexNet state dict."""
    text = str(spec)
    if text == "imagenet":
        loaded = _load_imagenet()
    elif text == "random" or text.startswith("random:"):
        loaded = _load_random(text)
    else:
        loaded = _load_file(Path(text))
    loaded.model.eval().to(device)
    return loaded


def _load_imagenet() -> LoadedModel:
    from torchvision.models import AlexNet_Weights

    weights = AlexNet_Weights.IMAGENET1K_V1
    said = io.StringIO()
    try:
        # torch.hub prints "Downloading ..." on stdout, which is for results: log it instead.
        with contextlib.redirect_stdout(said):
            state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, OSError, hash mismatch: all mean "not here"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"cannot get torchvision's ImageNet AlexNet weights ({type(exc).__name__}: {exc}); "
            f"put {Path(weights.url).name} in {cache.parent}, or name a checkpoint file in "
            "place of imagenet (--weights PATH, --finetune PATH; `retrieve train` makes one)"
        ) from exc
    finally:
        if said.getvalue().strip():
            log.info(said.getvalue().strip())
    model = _empty_alexnet(ModelArgs())
    model.load_state_dict(state)
    return LoadedModel(
        model=model,
        preprocessing=IMAGENET,
        sha256=state_dict_sha256(state),
        source="imagenet",
        classes=list(weights.meta["categories"]),
    )


def _load_random(text: str) -> LoadedModel:
    _, _, seed_text = text.partition(":")
    try:
        seed = int(seed_text) if seed_text else RANDOM_SEED
    except ValueError:
        raise WeightsError(f"--weights {text}: expected random or random:SEED") from None
    model = build_alexnet(ModelArgs(), seed=seed)
    return LoadedModel(
        model=model,
        preprocessing=IMAGENET,
        sha256=state_dict_sha256(model.state_dict()),
        source=f"random:{seed}",
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw contents of a weights file, refused with one clear line if it is not one."""
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"weights path is a folder, not a file: {path}")
    try:
        # weights_only: a checkpoint is data; never run code from a file the user downloaded.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights file {path}: not a checkpoint or state dict "
            f"({type(exc).__name__})"
        ) from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a state dict or checkpoint")
    return data


def _load_file(path: Path) -> LoadedModel:
    data = read_checkpoint(path)
    if data.get("format") == CHECKPOINT_FORMAT:
        args = ModelArgs.from_dict(data["model_args"])
        state = data["model"]
        preprocessing = Preprocessing.from_dict(data["preprocessing"])
        classes = data.get("classes")
        keys = ("recipe", "epoch", "metrics", "started_from", "class_names")
        metadata = {k: data[k] for k in keys if data.get(k) is not None}
    else:
        state = data.get("state_dict", data)
        args = _infer_args(state, path)
        preprocessing = IMAGENET if args.in_channels == 3 else _grey(IMAGENET)
        classes, metadata = None, {}
    try:
        model = _empty_alexnet(args)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise WeightsError(f"{path} does not fit AlexNet ({args.arch}): {first_line}") from exc
    return LoadedModel(
        model=model,
        preprocessing=preprocessing,
        sha256=state_dict_sha256(state),
        source=os.path.abspath(path),
        classes=list(classes) if classes else None,
        metadata=metadata,
    )


def _empty_alexnet(args: ModelArgs) -> AlexNet:
    """An AlexNet to load weights into; its throwaway initialisation draws from a forked RNG,
    so loading a model leaves the caller's random state as it was."""
    return build_alexnet(args, seed=0)


def _infer_args(state: dict[str, Any], path: Path) -> ModelArgs:
    """Architecture, channels, classes, batch norm and groups of a plain state dict, read from
    its shapes: conv1's kernel (4: cifar) and width (96: paper), running statistics (batch
    norm), conv2's inputs per group (the paper's two-GPU split)."""
    try:
        # Sorted by layer number only: tensors do not compare (another network may have
        # several weights under one number).
        convs = sorted(
            (
                (int(k.split(".")[1]), v)
                for k, v in state.items()
                if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4
            ),
            key=lambda item: item[0],
        )
        fcs = sorted(
            (
                (int(k.split(".")[1]), v)
                for k, v in state.items()
                if k.startswith("classifier.") and k.endswith(".weight") and v.ndim == 2
            ),
            key=lambda item: item[0],
        )
        conv1, conv2, head = convs[0][1], convs[1][1], fcs[-1][1]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise WeightsError(
            f"{path} is not an AlexNet state dict (no features.0.weight / classifier.6.weight)"
        ) from None
    arch = "cifar" if conv1.shape[-1] == 4 else "paper" if conv1.shape[0] == 96 else "torchvision"
    return ModelArgs(
        arch=arch,
        in_channels=int(conv1.shape[1]),
        num_classes=int(head.shape[0]),
        batch_norm=any(k.endswith("running_mean") for k in state),
        groups=max(1, int(conv1.shape[0]) // int(conv2.shape[1])),
    )


def _grey(preprocessing: Preprocessing) -> Preprocessing:
    return Preprocessing(
        resize=preprocessing.resize,
        crop=preprocessing.crop,
        mean=GREY_MEAN,
        std=GREY_STD,
        channels=1,
        interpolation=preprocessing.interpolation,
    )


def save_checkpoint(
    path: Path,
    model: AlexNet,
    preprocessing: Preprocessing,
    *,
    classes: list[str] | None = None,
    **extra: Any,
) -> None:
    """Write a self-describing checkpoint atomically; ``extra`` holds recipe, epoch, metrics, ...

    Everything in ``extra`` must be plain data (dicts, lists, numbers, strings, tensors) so the
    file loads with ``torch.load(weights_only=True)``.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_args": model.args.to_dict(),
        "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "preprocessing": preprocessing.to_dict(),
        "classes": list(classes) if classes is not None else None,
        **extra,
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
