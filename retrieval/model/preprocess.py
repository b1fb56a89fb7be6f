"""Preprocessing as data: what turns a decoded image into the model's input tensor.

A :class:`Preprocessing` is stored in checkpoints and index manifests, so a query is always
prepared exactly as the indexed images were; torch and torchvision are imported by the two steps,
not by this module, so a manifest's preprocessing is read and compared without them. The split
into a per-image part (resize and crop, on uint8, in decoder workers) and a per-batch part (scale
and normalise, where the model runs) is exactly torchvision's ``ImageClassification`` preset,
done in two steps: it keeps the tensors that cross process boundaries four times smaller, and
lets the GPU do the float work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Shorter side to ``resize``, centre crop ``crop``, scale to [0, 1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to before anything else."""
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("mean", "std"):
            if key in fields:
                fields[key] = tuple(float(v) for v in fields[key])
        return cls(**fields)

    def resize_and_crop(self, image: Image.Image) -> torch.Tensor:
        """The per-image step: a uint8 ``C x crop x crop`` tensor.

        Exactly torchvision's ``resize`` (shorter side, PIL filter) + ``center_crop`` +
        ``pil_to_tensor`` on a PIL image, which call Pillow themselves; written with Pillow
        here because importing torchvision costs a query process ~1.3 s of CPU (its package
        imports every model). ``tests/test_preprocess.py`` checks the pixels are identical."""
        import numpy as np
        import torch

        if image.mode != self.mode:
            image = image.convert(self.mode)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != (width, height):
            image = image.resize(size, _pil_filter(self.interpolation))
        top = round((size[1] - self.crop) / 2.0)
        left = round((size[0] - self.crop) / 2.0)
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.array(image, copy=True))
        return pixels.view(self.crop, self.crop, self.channels).permute(2, 0, 1)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """The per-batch step: uint8 ``N x C x H x W`` to normalised float32 on its device.

        Mean and std go in as Python numbers, one channel at a time: ``torch.tensor(list,
        device="cuda")`` would be a blocking host-to-device copy, two per batch on the GPU."""
        import torch

        batch = batch.to(torch.float32).div_(255.0)
        for channel, (mean, std) in enumerate(zip(self.mean, self.std)):
            batch[:, channel].sub_(mean).div_(std)
        return batch

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image to a normalised ``C x crop x crop`` float tensor."""
        return self.normalize(self.resize_and_crop(image).unsqueeze(0))[0]


def _pil_filter(interpolation: str) -> int:
    """torchvision's InterpolationMode name -> the Pillow filter its PIL path uses."""
    from PIL import Image

    filters = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
        "lanczos": Image.Resampling.LANCZOS,
    }
    try:
        return filters[interpolation]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}") from None


IMAGENET = Preprocessing()
