"""Gradient inversion: SSIM against scikit-image, iDLG's label, and a tiny CNN's single-image
gradient inverted, while the sum of several clients' gradients is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from fedvlm.evaluation.inversion import (
    InversionSettings,
    invert_gradients,
    random_baseline_ssim,
    reconstruction_quality,
    recover_label,
)


def _blob(size: int = 16) -> torch.Tensor:
    """A smooth test image in [0, 1]: a Gaussian spot on a gentle ramp."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    spot = 0.8 * torch.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.2)
    return (spot + 0.1 * torch.sin(3 * xx) + 0.1).clamp(0, 1)[None, None]


def test_ssim_and_psnr_agree_with_scikit_image() -> None:
    rng = np.random.default_rng(0)
    original = rng.random((48, 48))
    distorted = np.clip(original + rng.normal(0, 0.1, original.shape), 0, 1)
    quality = reconstruction_quality(
        torch.tensor(distorted, dtype=torch.float32)[None, None],
        torch.tensor(original, dtype=torch.float32)[None, None],
    )
    reference = structural_similarity(
        original, distorted, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert quality["ssim_mean"] == pytest.approx(reference, abs=0.02)
    assert quality["psnr_mean"] == pytest.approx(peak_signal_noise_ratio(original, distorted, data_range=1.0), abs=1e-3)


def _cnn() -> nn.Module:
    """BatchNorm-free, smooth activations: the easy case for an attacker."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def _gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(model(images), labels, reduction="sum")
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def test_a_single_images_gradient_gives_the_image_back_and_a_sum_of_eight_does_not() -> None:
    model, original, label = _cnn(), _blob(), torch.tensor([3])
    gradient = _gradient(model, original, label)
    recovered = recover_label(gradient[-2])  # the last Linear's weight gradient
    assert recovered == 3

    settings = InversionSettings(steps=1500, lr=0.02, tv_weight=0.0)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), torch.tensor([recovered]))

    single = invert_gradients(loss_of, list(model.parameters()), gradient, original.shape, settings)
    assert reconstruction_quality(single, original)["ssim_mean"] >= 0.9

    # the server under SecAgg+ sees the sum of the clients' gradients: this image and 7 others
    others = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    summed = [a + b for a, b in zip(gradient, _gradient(model, others, torch.randint(0, 10, (7,))), strict=True)]
    mixed = invert_gradients(loss_of, list(model.parameters()), summed, original.shape, settings)
    baseline = random_baseline_ssim(original)
    assert abs(baseline) < 0.1
    assert reconstruction_quality(mixed, original)["ssim_mean"] < 0.3
