"""Gradient inversion, measured: how much of an image an honest-but-curious server can rebuild
from what a client sends (Geiping et al. 2020, "Inverting Gradients").

The attacker holds the model the client started from and the gradient (or update) it sent. It
recovers the label from the last layer's gradient (iDLG, Zhao et al. 2020: with cross-entropy
and one record, the true class's row of the last weight gradient is the only one with a negative
sum, as ``∂L/∂z_c = p_c − 1 < 0``), then optimises a dummy image ``x`` so that the gradient it
produces points the same way as the target:

    min_x  1 − ⟨∇θ L(x, y), g⟩ / (‖∇θ L(x, y)‖ ‖g‖)  +  β · TV(x),

with Adam (``signed=True``: Adam on the sign of the gradient, as in Geiping et al.'s code) and
the learning rate cut 10× at 3/8, 5/8 and 7/8 of the steps; ``x`` stays in the data range.
Reconstructions are scored against their originals with SSIM (torchmetrics, ``data_range`` the
image range) and PSNR; :func:`random_baseline_ssim` is what a guess of noise scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


@dataclass(frozen=True)
class InversionSettings:
    """How hard the attacker tries.

    Attributes:
        steps: Optimisation steps.
        lr: Adam's learning rate (cut 10× at 3/8, 5/8 and 7/8 of ``steps``).
        tv_weight: β of the total-variation prior (0: none; Geiping et al. use 1e-4 on ImageNet
            images, where the gradient leaves more ambiguity; on a small image that a gradient
            pins down it only blurs the answer).
        signed: Step on the sign of the gradient (Geiping et al.'s variant).
        data_range: ``(low, high)`` of pixel values; the dummy image is kept inside.
        seed: Seed of the dummy image's random start.
    """

    steps: int = 3000
    lr: float = 0.05
    tv_weight: float = 0.0
    signed: bool = False
    data_range: tuple[float, float] = (0.0, 1.0)
    seed: int = 0


def recover_label(last_weight_gradient: torch.Tensor) -> int:
    """iDLG: the class whose row of the last linear layer's weight gradient sums lowest.

    Example:
        >>> recover_label(torch.tensor([[0.2, 0.1], [-0.5, -0.4], [0.3, 0.3]]))
        1
    """
    return int(last_weight_gradient.sum(dim=1).argmin())


def gradient_cosine_distance(gradient: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 − cos`` between two gradients, each the concatenation of its tensors.

    Example:
        >>> a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
        >>> abs(float(gradient_cosine_distance(a, [2 * t for t in a]))) < 1e-6  # same direction
        True
    """
    dot = sum((g * t).sum() for g, t in zip(gradient, target, strict=True))
    norm_g = torch.sqrt(sum((g * g).sum() for g in gradient))  # type: ignore[arg-type]
    norm_t = torch.sqrt(sum((t * t).sum() for t in target))  # type: ignore[arg-type]
    return 1 - dot / (norm_g * norm_t)  # type: ignore[no-any-return]


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (both axes) of ``[B, C, H, W]`` images."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (
        images[..., :, 1:] - images[..., :, :-1]
    ).abs().mean()


def invert_gradients(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    parameters: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    shape: Sequence[int],
    settings: InversionSettings = InversionSettings(),
) -> torch.Tensor:
    """The image whose gradient best matches ``target`` (module docstring).

    Args:
        loss_of: The attacked model's loss of an image batch with the recovered labels
            (e.g. ``lambda x: cross_entropy(model(x), labels)``).
        parameters: The parameters ``target`` is the gradient of, in the same order.
        target: The gradient the client sent (for a multi-step update: the update itself,
            whose direction is what a cosine compares).
        shape: ``[B, C, H, W]`` of the images to rebuild.
        settings: Steps, learning rate, prior, data range, seed.

    Returns:
        The reconstruction, detached, inside ``settings.data_range``.
    """
    low, high = settings.data_range
    generator = torch.Generator().manual_seed(settings.seed)
    dummy = (low + (high - low) * torch.rand(*shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=settings.lr)
    milestones = [settings.steps * k // 8 for k in (3, 5, 7)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    target = [t.detach() for t in target]
    for _ in range(settings.steps):
        optimizer.zero_grad()
        gradient = torch.autograd.grad(loss_of(dummy), list(parameters), create_graph=True)
        objective = gradient_cosine_distance(gradient, target)
        if settings.tv_weight:
            objective = objective + settings.tv_weight * total_variation(dummy)
        objective.backward()
        if settings.signed:
            assert dummy.grad is not None
            dummy.grad.sign_()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(low, high)
    return dummy.detach()


def reconstruction_quality(
    reconstruction: torch.Tensor, original: torch.Tensor, data_range: tuple[float, float] = (0.0, 1.0)
) -> dict[str, float]:
    """Mean SSIM and PSNR over a batch, each reconstruction against its own original."""
    span = data_range[1] - data_range[0]
    ssim = structural_similarity_index_measure(reconstruction, original, data_range=span, reduction="none")
    psnr = peak_signal_noise_ratio(reconstruction, original, data_range=span, reduction="none", dim=(1, 2, 3))
    return {"ssim_mean": float(torch.as_tensor(ssim).mean()), "psnr_mean": float(torch.as_tensor(psnr).mean())}


def random_baseline_ssim(original: torch.Tensor, data_range: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> float:
    """SSIM of uniform noise in the data range against the originals: what guessing scores."""
    low, high = data_range
    noise = low + (high - low) * torch.rand(original.shape, generator=torch.Generator().manual_seed(seed))
    return reconstruction_quality(noise, original, data_range)["ssim_mean"]


__all__ = [
    "InversionSettings",
    "gradient_cosine_distance",
    "invert_gradients",
    "random_baseline_ssim",
    "reconstruction_quality",
    "recover_label",
    "total_variation",
]
