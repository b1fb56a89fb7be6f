"""Preprocessing without torchvision gives torchvision's pixels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from retrieval.model.preprocess import Preprocessing


def torchvision_crop(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    image = image.convert(prep.mode)
    interpolation = InterpolationMode(prep.interpolation)
    image = F.resize(image, [prep.resize], interpolation=interpolation, antialias=True)
    return F.pil_to_tensor(F.center_crop(image, [prep.crop]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_resize_and_crop_equals_torchvision_for_any_shape(interpolation, mode) -> None:
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    mean = (0.5,) * channels
    for resize, crop in ((73, 64), (256, 224), (40, 33)):
        prep = Preprocessing(resize, crop, mean, mean, channels, interpolation)
        for width, height in ((resize, resize), (31, 97), (300, 41), (640, 480), (65, 64)):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            ours = prep.resize_and_crop(image)
            assert ours.shape == (channels, crop, crop) and ours.dtype == torch.uint8
            assert torch.equal(ours, torchvision_crop(image, prep)), (width, height, resize)
