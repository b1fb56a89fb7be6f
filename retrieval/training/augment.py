"""The paper's data augmentation (section 4.1), done on whole uint8 batches in torch.

Images arrive as ``N x C x R x R`` uint8 squares: the paper's "shorter side to 256, central
256 x 256 patch", with R scaled to the chosen image size (R = round(S * 256 / 224)). From there:

1. a random ``S x S`` crop and a horizontal flip per image (the paper's 224 of 256);
2. PCA colour augmentation: to every pixel of an image add ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T``,
   with ``p_i, l_i`` the eigenvectors and eigenvalues of the training set's RGB covariance and
   one ``a_i ~ N(0, 0.1)`` per image, drawn afresh each time the image is used.

Working on batches keeps the CPU path fast (one tensor op instead of 128 PIL calls) and lets a
GPU do the same work. All randomness comes from an explicit ``torch.Generator``, so a resumed
run sees exactly the same crops, flips and colours as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# Paper section 2: rescale to 256, train on 224 crops; smaller sizes keep that ratio.
PAPER_RESIZE, PAPER_CROP = 256, 224


def resize_for(image_size: int) -> int:
    """The square side the crops are cut from, for a network input of ``image_size``."""
    return round(image_size * PAPER_RESIZE / PAPER_CROP)


def resize_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 ``N x C x H x W`` batch of squares to ``size x size`` (bilinear)."""
    if batch.shape[-1] == size and batch.shape[-2] == size:
        return batch
    resized = F.interpolate(
        batch.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def random_crop_flip(
    batch: torch.Tensor, size: int, generator: torch.Generator, *, flip: bool = True
) -> torch.Tensor:
    """One random ``size x size`` crop per image and, with ``flip``, a horizontal flip with p=1/2.

    Gathering with per-image offsets keeps it one indexing op for the whole batch.
    """
    n, _, h, w = batch.shape
    if size > h or size > w:
        raise ValueError(f"crop {size} is larger than the images ({h} x {w})")
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    offsets = torch.arange(size)
    rows = (top[:, None] + offsets[None, :]).to(batch.device)  # N x S
    cols = left[:, None] + offsets[None, :]
    cols = torch.where(flips[:, None], cols.flip(1), cols).to(batch.device)
    index = torch.arange(n, device=batch.device)[:, None, None]
    # batch[i, :, rows[i], cols[i]] for every i, as one advanced-indexing gather.
    out = batch.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` patch (torchvision's rounding of the offsets)."""
    h, w = batch.shape[-2:]
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return batch[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class PCAColor:
    """Paper section 4.1's colour augmentation; ``eigvals`` and ``eigvecs`` on [0, 1] pixels.

    ``eigvecs[:, i]`` is the i-th principal component (a column), as ``torch.linalg.eigh``
    returns them. Works for any number of channels (for 1 channel it is a brightness shift).
    """

    eigvals: torch.Tensor  # (C,)
    eigvecs: torch.Tensor  # (C, C), columns are components
    std: float = 0.1

    def __post_init__(self) -> None:
        # eigh returns column-major eigenvectors; a checkpoint's copy comes back row-major, and
        # the two layouts round the shift's matmul differently, so a resumed run's colours
        # drifted by an ulp from an uninterrupted run's. One layout for both.
        for name in ("eigvals", "eigvecs"):
            value = getattr(self, name).to(torch.float32).contiguous()
            object.__setattr__(self, name, value)

    def sample_alphas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """One ``alpha ~ N(0, std)`` per image and component: ``N x C``."""
        return torch.randn(n, self.eigvals.numel(), generator=generator) * self.std

    def shifts(self, alphas: torch.Tensor) -> torch.Tensor:
        """The colour each image's pixels move by: ``eigvecs @ (alpha * eigvals)``, ``N x C``."""
        return (alphas * self.eigvals.to(alphas)) @ self.eigvecs.to(alphas).T

    def apply(self, batch: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """Add each image's shift to all of its pixels; ``batch`` is float ``N x C x H x W``."""
        shift = self.shifts(alphas.to(batch.device, torch.float32)).to(batch.dtype)
        return batch + shift[:, :, None, None]

    def to_dict(self) -> dict:
        return {"eigvals": self.eigvals.tolist(), "eigvecs": self.eigvecs.tolist(), "std": self.std}

    @classmethod
    def from_dict(cls, data: dict) -> PCAColor:
        return cls(
            eigvals=torch.tensor(data["eigvals"], dtype=torch.float32),
            eigvecs=torch.tensor(data["eigvecs"], dtype=torch.float32),
            std=float(data.get("std", 0.1)),
        )


@dataclass(frozen=True)
class PixelStats:
    """Per-channel mean and std, and the PCA of the pixel covariance, all on [0, 1] values."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pca: PCAColor


def pixel_stats(images: torch.Tensor, max_pixels: int = 4_000_000, seed: int = 0) -> PixelStats:
    """Mean, std and colour PCA of a uint8 ``N x C x H x W`` sample of the training set.

    Paper section 4.1 computes the PCA "throughout the ImageNet training set"; a few million
    pixels give the same 3 x 3 covariance to three digits, so a random subset is used.
    """
    channels = images.shape[1]
    pixels = images.permute(1, 0, 2, 3).reshape(channels, -1)
    if pixels.shape[1] > max_pixels:
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, pixels.shape[1], (max_pixels,), generator=generator)
        pixels = pixels[:, pick]
    values = pixels.to(torch.float64) / 255.0
    mean = values.mean(dim=1)
    centred = values - mean[:, None]
    cov = centred @ centred.T / max(values.shape[1] - 1, 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    std = cov.diagonal().sqrt().clamp_min(1e-6)
    return PixelStats(
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        pca=PCAColor(eigvals.clamp_min(0).float(), eigvecs.float()),
    )


@dataclass(frozen=True)
class Augmentation:
    """Which of the paper's augmentations a recipe uses."""

    random_crop: bool = True
    flip: bool = True
    pca_color: bool = True
    pca_std: float = 0.1


class BatchTransform:
    """uint8 ``R x R`` squares -> normalised, augmented float ``S x S`` inputs, on any device."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pca: PCAColor | None = None,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.image_size = image_size
        self.augmentation = augmentation or Augmentation()
        self.pca = pca if self.augmentation.pca_color else None
        if self.pca is not None and self.augmentation.pca_std != self.pca.std:
            self.pca = PCAColor(self.pca.eigvals, self.pca.eigvecs, self.augmentation.pca_std)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None, *, train: bool = True
    ) -> torch.Tensor:
        """``train=False`` (or no generator) gives the evaluation input: the central crop."""
        aug = self.augmentation
        if train and generator is not None and aug.random_crop:
            batch = random_crop_flip(batch, self.image_size, generator, flip=aug.flip)
        else:
            batch = center_crop(batch, self.image_size)
            if train and generator is not None and aug.flip:
                flips = (torch.rand(batch.shape[0], generator=generator) < 0.5).to(batch.device)
                batch = torch.where(flips[:, None, None, None], batch.flip(-1), batch)
        x = batch.to(torch.float32).div_(255.0)
        if train and generator is not None and self.pca is not None:
            x = self.pca.apply(x, self.pca.sample_alphas(x.shape[0], generator))
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
