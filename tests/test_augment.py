"""The paper's augmentations (section 4.1) on batches."""

from __future__ import annotations

import torch

from retrieval.training.augment import (
    Augmentation,
    BatchTransform,
    PCAColor,
    center_crop,
    pixel_stats,
    random_crop_flip,
    resize_batch,
    resize_for,
)


def _coloured_batch(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def test_pca_colour_adds_the_same_multiple_of_the_principal_components_to_every_pixel() -> None:
    # Correlated RGB pixels, so the three components differ clearly.
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(2000, 1, generator=generator)
    rgb = torch.cat([base, 0.8 * base, 0.3 * base], dim=1) + 0.05 * torch.rand(2000, 3)
    sample = (rgb.T.reshape(3, 40, 50).unsqueeze(0) * 255).round().to(torch.uint8)
    pca = pixel_stats(sample).pca
    # eigenvectors are orthonormal columns, eigenvalues the variance along each
    assert torch.allclose(pca.eigvecs.T @ pca.eigvecs, torch.eye(3), atol=1e-5)

    images = torch.rand(3, 3, 8, 8)
    alphas = pca.sample_alphas(3, torch.Generator().manual_seed(7))
    assert alphas.shape == (3, 3)
    out = pca.apply(images, alphas)
    diff = out - images  # N x 3 x H x W
    per_image = diff[:, :, :1, :1]
    # one colour per image, the same at every pixel
    assert torch.allclose(diff, per_image.expand_as(diff), atol=1e-6)
    shift = per_image[:, :, 0, 0]
    # ... equal to [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T ...
    expected = torch.stack([pca.eigvecs @ (a * pca.eigvals) for a in alphas])
    assert torch.allclose(shift, expected, atol=1e-6)
    # ... so its coordinates in the eigenvector basis are exactly alpha_i * lambda_i.
    coefficients = shift @ pca.eigvecs
    assert torch.allclose(coefficients, alphas * pca.eigvals, atol=1e-6)


def test_pca_alphas_have_the_papers_standard_deviation() -> None:
    pca = PCAColor(torch.ones(3), torch.eye(3))
    alphas = pca.sample_alphas(20000, torch.Generator().manual_seed(0))
    assert abs(float(alphas.std()) - 0.1) < 0.005
    assert abs(float(alphas.mean())) < 0.005


def test_pixel_stats_recover_mean_std_and_principal_axis() -> None:
    generator = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (1, 1, 64, 64), generator=generator)
    sample = grey.expand(1, 3, 64, 64).to(torch.uint8)  # R = G = B
    stats = pixel_stats(sample)
    values = grey.float() / 255
    assert all(abs(m - float(values.mean())) < 1e-6 for m in stats.mean)
    assert all(abs(s - float(values.std())) < 1e-4 for s in stats.std)
    principal = stats.pca.eigvecs[:, -1].abs()  # eigh sorts eigenvalues ascending
    assert torch.allclose(principal, torch.full((3,), 3**-0.5), atol=1e-5)
    assert stats.pca.eigvals[:2].abs().max() < 1e-6


def test_random_crop_flip_cuts_real_crops_and_mirrors_some() -> None:
    batch = _coloured_batch(n=32, size=12)
    out = random_crop_flip(batch, 8, torch.Generator().manual_seed(3))
    assert out.shape == (32, 3, 8, 8)
    flipped = 0
    for image, crop in zip(batch, out, strict=True):
        windows = {
            (t, left, f)
            for t in range(5)
            for left in range(5)
            for f in (False, True)
            if torch.equal(
                crop,
                image[:, t : t + 8, left : left + 8].flip(-1)
                if f
                else image[:, t : t + 8, left : left + 8],
            )
        }
        assert windows, "every output is a window of its own image"
        flipped += all(f for _, _, f in windows)
    assert 4 < flipped < 28


def test_crops_and_flips_repeat_with_the_same_generator_seed() -> None:
    batch = _coloured_batch(n=8, size=12)
    a = random_crop_flip(batch, 8, torch.Generator().manual_seed(5))
    b = random_crop_flip(batch, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_evaluation_transform_is_the_normalised_centre_crop() -> None:
    batch = _coloured_batch(n=2, size=12)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = BatchTransform(8, mean, std, augmentation=Augmentation(pca_color=False))
    out = transform(batch, train=False)
    expected = (
        center_crop(batch, 8).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)
    ) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected)
    assert torch.equal(center_crop(batch, 8), batch[:, :, 2:10, 2:10])


def test_image_sizes_keep_the_papers_crop_ratio() -> None:
    assert resize_for(224) == 256
    assert resize_for(64) == 73
    assert resize_batch(_coloured_batch(size=28), 73).shape[-2:] == (73, 73)


def test_pca_colour_read_back_from_a_checkpoint_shifts_bitwise_alike() -> None:
    # eigh's eigenvectors are column-major; the checkpoint's copy is row-major. Both must give
    # the same shifts to the last bit, or a resumed run's colours drift from an uninterrupted one.
    pca = pixel_stats(_coloured_batch(8, 20)).pca
    restored = PCAColor.from_dict(pca.to_dict())
    alphas = pca.sample_alphas(9, torch.Generator().manual_seed(3))
    assert torch.equal(pca.shifts(alphas), restored.shifts(alphas))
