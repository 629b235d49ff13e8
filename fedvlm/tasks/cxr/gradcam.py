"""Grad-CAM of the chest X-ray model's zero-shot label logits (:func:`fedvlm.explain.gradcam.grad_cam`
on the image tower of a :class:`~fedvlm.tasks.cxr.module.ContrastiveVLM`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedvlm.errors import ConfigError
from fedvlm.explain.gradcam import grad_cam, target_layer
from fedvlm.tasks.cxr.module import ContrastiveVLM


def label_logits(module: ContrastiveVLM, images: torch.Tensor) -> torch.Tensor:
    """The logit of every label's probability, ``[B, C]``.

    A vision-language model's zero-shot probability is ``softmax(s_pos, s_neg)[0]`` with
    ``s = scale · u·v``, whose logit is ``scale · (u·v_pos − u·v_neg)``; an image-only model's is
    its label head's output. The prompt embeddings do not depend on the image and are computed
    without gradients.

    Raises:
        ConfigError: For a text-only model (no image tower to explain).
    """
    if module.modality == "fused":
        with torch.no_grad():
            prompts = module.prompt_embeddings()
        similarity = torch.einsum("bp,ckp->bck", module.embed_images(images), prompts)
        return module.scale() * (similarity[..., 0] - similarity[..., 1])
    if module.modality == "image":
        assert module.image_label_head is not None
        return module.image_label_head(module.image_features(images))
    raise ConfigError("Grad-CAM explains an image tower; this model is text-only (model.modality=text)")


def cxr_grad_cam(
    module: ContrastiveVLM, images: torch.Tensor, labels: Sequence[int | str], layer: str | None = None
) -> torch.Tensor:
    """Grad-CAM maps of some labels of a chest X-ray model.

    Args:
        module: A vision-language or image-only :class:`~fedvlm.tasks.cxr.module.ContrastiveVLM`.
        images: ``[B, 3, H, W]`` normalised images.
        labels: Label indices or names.
        layer: Backbone submodule to read instead of :func:`target_layer`'s default.

    Returns:
        ``[B, len(labels), H, W]`` maps in [0, 1].

    Raises:
        ConfigError: For an unknown label or a model without an image tower.
    """
    if module.image_encoder is None:
        raise ConfigError("Grad-CAM explains an image tower; this model is text-only (model.modality=text)")
    columns = []
    for label in labels:
        if isinstance(label, str) and label not in module.label_names:
            raise ConfigError(f"unknown label {label!r}; labels: {', '.join(module.label_names)}")
        columns.append(module.label_names.index(label) if isinstance(label, str) else int(label))
    _, target = target_layer(module.image_encoder, layer, image_size=int(images.shape[-1]))
    index = torch.tensor(columns, device=images.device)
    return grad_cam(
        module, target, images, lambda x: label_logits(module, x)[:, index], token_grid=module.image_encoder.patch_grid
    )
