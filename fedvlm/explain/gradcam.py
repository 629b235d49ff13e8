"""Grad-CAM heatmaps of a chest X-ray model's labels, for CNN and ViT image towers.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", Eqs. 1–2) weights a layer's activation maps ``A^k`` by the spatial
mean of the target's gradient and keeps the positive part:

    α_k = 1/Z Σ_ij ∂y/∂A^k_ij,        L = ReLU(Σ_k α_k A^k).

* **CNN towers** (timm ResNets): ``A`` is the last convolutional stage (``layer4``), ``[B, K, h, w]``,
  or, for small inputs, the last stage whose map still has :data:`MIN_CAM_GRID` cells a side
  (a ResNet's ``layer4`` is 1×1 at 32 px, a map that cannot point anywhere).
* **ViT towers**: ``A`` is the patch tokens entering the last block (its ``norm1``),
  ``[B, N, D]`` reshaped to the patch grid; prefix tokens (class, registers) are dropped. The
  input of the last block is used, not its output, because a class-token-pooled ViT passes no
  gradient from its last block's output to the patch tokens.

The target ``y`` of a label (:func:`label_logits`) is its zero-shot logit for a vision-language
model, ``scale · (u·v_pos − u·v_neg)`` (the logit of ``softmax(s_pos, s_neg)[0]``, the zero-shot
probability), or the label head's logit for an image-only model. Maps are upsampled (bilinear)
to the image and divided by their maximum, so each lies in [0, 1].

Hooks are removed and the module's train/eval modes and ``requires_grad`` flags are restored
on return, also when an error is raised; parameter ``.grad`` fields are never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fedvlm.errors import ConfigError

Score = Callable[[torch.Tensor], torch.Tensor]
MIN_CAM_GRID = 4
"""Smallest side (in cells) of a CNN stage chosen by default, when the image size is known."""


@contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(sub, sub.training) for sub in module.modules()]
    flags = [(param, param.requires_grad) for param in module.parameters()]
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def target_layer(
    image_encoder: nn.Module, layer: str | None = None, image_size: int | None = None
) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads in an image tower (a :class:`~fedvlm.models.encoders.ImageEncoder`).

    Args:
        image_encoder: The tower; its timm model is ``.backbone``.
        layer: A dotted submodule path inside the backbone to use instead (``"layer3"``).
        image_size: Input side in pixels; when given, a CNN's default is the last stage whose
            map is at least :data:`MIN_CAM_GRID` cells a side (the first stage if none is).

    Returns:
        The layer's dotted path inside the backbone and the layer: ``blocks.<last>.norm1`` for a
        ViT, the last stage of timm's ``feature_info`` (``layer4`` for a ResNet) otherwise, else
        the last ``Conv2d``.

    Raises:
        ConfigError: If ``layer`` is not a submodule, or no layer can be found.
    """
    found = getattr(image_encoder, "backbone", image_encoder)
    backbone: nn.Module = found if isinstance(found, nn.Module) else image_encoder
    if layer is not None:
        try:
            return layer, backbone.get_submodule(layer)
        except AttributeError:
            raise ConfigError(f"Grad-CAM layer {layer!r} is not a submodule of {type(backbone).__name__}") from None
    blocks = getattr(backbone, "blocks", None)
    if getattr(image_encoder, "patch_grid", None) is not None and isinstance(blocks, nn.Sequential) and len(blocks):
        name = f"blocks.{len(blocks) - 1}"
        last: nn.Module = blocks[-1]
        norm1 = getattr(last, "norm1", None)
        return (f"{name}.norm1", norm1) if isinstance(norm1, nn.Module) else (name, last)
    feature_info = getattr(backbone, "feature_info", None)
    if isinstance(feature_info, list) and feature_info and all("module" in stage for stage in feature_info):
        stages = feature_info
        if image_size is not None:
            large = [stage for stage in feature_info if image_size // int(stage["reduction"]) >= MIN_CAM_GRID]
            stages = large or feature_info[:1]
        name = str(stages[-1]["module"])
        return name, backbone.get_submodule(name)
    convs = [(name, sub) for name, sub in backbone.named_modules() if isinstance(sub, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"no Grad-CAM layer found in {type(backbone).__name__}; name one with layer=")
    return convs[-1]


def grad_cam(
    model: nn.Module,
    layer: nn.Module,
    images: torch.Tensor,
    score: Score,
    token_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps of ``K`` targets for a batch of images (Selvaraju et al. 2017, Eqs. 1–2).

    Args:
        model: The module ``score`` runs (put in eval mode for the call, then restored).
        layer: The layer whose output is ``A``: ``[B, K, h, w]`` feature maps, or ``[B, N, D]``
            tokens whose last ``rows · cols`` are the patches of ``token_grid``.
        images: ``[B, 3, H, W]`` model inputs.
        score: Maps the images to the targets ``y``, ``[B]`` or ``[B, K]``.
        token_grid: ``(rows, cols)`` of the patch grid, for a token layer.

    Returns:
        ``[B, H, W]`` (or ``[B, K, H, W]`` for ``[B, K]`` targets) maps in [0, 1], each divided by
        its maximum (all zeros when no location has a positive contribution).

    Raises:
        RuntimeError: If ``layer`` does not run exactly once in ``score``.
        ValueError: If a token layer has no ``token_grid`` or fewer tokens than the grid.
    """
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output if isinstance(output, torch.Tensor) else output[0])  # type: ignore[index]

    with preserved_state(model):
        model.eval()
        handle = layer.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                # Gradients flow from the input, so frozen towers (requires_grad=False) work too.
                inputs = images.detach().clone().requires_grad_(True)
                targets = score(inputs)
                if len(captured) != 1:
                    raise RuntimeError(f"the Grad-CAM layer ran {len(captured)} times in one forward, expected once")
                activations = captured[0]
                single = targets.ndim == 1
                columns = targets.unsqueeze(1) if single else targets
                gradients = [
                    torch.autograd.grad(columns[:, k].sum(), activations, retain_graph=k < columns.shape[1] - 1)[0]
                    for k in range(columns.shape[1])
                ]
        finally:
            handle.remove()
    maps = torch.stack([_cam(activations.detach(), grad, token_grid) for grad in gradients], dim=1)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp_min(0.0)
    peak = maps.flatten(2).amax(dim=2)[..., None, None]
    maps = torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    return maps[:, 0] if single else maps


def _cam(activations: torch.Tensor, gradients: torch.Tensor, token_grid: tuple[int, int] | None) -> torch.Tensor:
    """``ReLU(Σ_k α_k A^k)`` at the layer's resolution ``[B, h, w]``."""
    if activations.ndim == 4:
        weights = gradients.mean(dim=(2, 3))
        return torch.relu(torch.einsum("bkhw,bk->bhw", activations, weights))
    if activations.ndim != 3:
        raise ValueError(f"Grad-CAM needs [B,K,h,w] maps or [B,N,D] tokens, got {tuple(activations.shape)}")
    if token_grid is None:
        raise ValueError("a token layer needs the patch grid (token_grid)")
    rows, cols = token_grid
    prefix = activations.shape[1] - rows * cols
    if prefix < 0:
        raise ValueError(f"{activations.shape[1]} tokens do not fill a {rows}x{cols} patch grid")
    patches, patch_gradients = activations[:, prefix:], gradients[:, prefix:]
    weights = patch_gradients.mean(dim=1)
    return torch.relu(torch.einsum("bnd,bd->bn", patches, weights)).reshape(-1, rows, cols)
