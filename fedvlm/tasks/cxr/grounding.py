"""Token↔region grounding of a chest X-ray vision-language model, and text alignment scores.

A report phrase ("moderate right pleural effusion") is embedded alone with ``embed_texts``;
each image region is embedded in the same shared space by sending the tower's spatial features
through the image projection, as the pooled feature is:

* **ViT**: every patch token after the last block (and the final norm) through ``fc_norm`` (the
  norm an average-pooled ViT applies after pooling) and ``image_projection``;
* **CNN**: every location of the last feature map ``[B, K, h, w]`` through ``image_projection``
  (for an average-pooled CNN the projection of the pooled feature is exactly the mean of the
  regions' projections).

The cosine similarity of the phrase to each region is its heatmap (:func:`phrase_heatmaps`).
**Text alignment** (FedVLM's interpretability scores) asks whether the heatmap of each finding's
phrase peaks inside that finding's own lesion, in particular in studies with several findings,
whether it is hotter over its own lesion than over the study's other lesions, and whether the
phrase ranks its own image above images without the finding (:class:`TextAlignmentScores`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import tokenize
from fedvlm.errors import ConfigError
from fedvlm.tasks.cxr.scores import PEAK_TOLERANCE, pointing_score


def region_embeddings(module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """L2-normalised embeddings of every image region in the shared space.

    Args:
        module: A vision-language model: ``image_encoder.backbone`` a timm model with
            ``forward_features`` (and ``image_encoder.patch_grid`` for a ViT) and
            ``image_projection`` (a :class:`~fedvlm.tasks.cxr.module.ContrastiveVLM`).
        images: ``[B, 3, H, W]`` normalised images.

    Returns:
        ``[B, rows · cols, P]`` embeddings (row-major over the grid) and the grid ``(rows, cols)``.

    Raises:
        ConfigError: For a model without a shared space or an image tower.
        ValueError: If the features are neither ``[B, K, h, w]`` maps nor ``[B, N, D]`` tokens.
    """
    projection = getattr(module, "image_projection", None)
    encoder = getattr(module, "image_encoder", None)
    if projection is None or encoder is None:
        raise ConfigError("grounding needs a vision-language model (model.modality=fused)")
    backbone = encoder.backbone
    features = backbone.forward_features(images)
    if features.ndim == 4:
        rows, cols = features.shape[-2:]
        regions = features.flatten(2).transpose(1, 2)
    elif features.ndim == 3:
        if encoder.patch_grid is None:
            raise ValueError("token features need the image encoder's patch_grid")
        rows, cols = encoder.patch_grid
        regions = features[:, features.shape[1] - rows * cols :]
        fc_norm = getattr(backbone, "fc_norm", None)
        if isinstance(fc_norm, nn.Module):
            regions = fc_norm(regions)
    else:
        raise ValueError(
            f"expected [B,K,h,w] maps or [B,N,D] tokens from forward_features, got {tuple(features.shape)}"
        )
    return F.normalize(projection(regions), dim=-1), (int(rows), int(cols))


@torch.no_grad()
def phrase_embeddings(
    module: nn.Module, tokenizer: PreTrainedTokenizerBase, phrases: Sequence[str], max_text_length: int
) -> torch.Tensor:
    """``embed_texts`` of each phrase alone, ``[K, P]`` (normalised)."""
    tokens = tokenize(tokenizer, list(phrases), max_text_length)
    device = next(module.parameters()).device
    return module.embed_texts(  # type: ignore[operator]
        tokens["input_ids"].long().to(device), tokens["attention_mask"].long().to(device)
    )


def grounding_maps(regions: torch.Tensor, phrases: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each phrase to each region, ``[K, rows, cols]``.

    Args:
        regions: ``[rows · cols, P]`` normalised region embeddings of one image.
        phrases: ``[K, P]`` normalised phrase embeddings.
        grid: ``(rows, cols)``.

    Example:
        >>> regions = torch.eye(4)[:, :3]  # region 3 is the zero vector
        >>> grounding_maps(regions, torch.tensor([[0.0, 1.0, 0.0]]), (2, 2)).tolist()
        [[[0.0, 1.0], [0.0, 0.0]]]
    """
    return (phrases @ regions.T).reshape(phrases.shape[0], *grid)


@torch.no_grad()
def phrase_heatmaps(module: nn.Module, images: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
    """Grounding heatmaps of phrases over images, at the image size.

    Args:
        module: A vision-language model (see :func:`region_embeddings`).
        images: ``[B, 3, H, W]`` normalised images.
        phrases: ``[K, P]`` normalised phrase embeddings (:func:`phrase_embeddings`).

    Returns:
        ``[B, K, H, W]`` cosine similarities in [-1, 1], upsampled bilinearly from the region grid.
    """
    regions, grid = region_embeddings(module, images)
    maps = torch.stack([grounding_maps(image_regions, phrases, grid) for image_regions in regions])
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)


@dataclass
class TextAlignmentScores:
    """Accumulates how well finding phrases ground in their own lesions.

    * ``text_alignment_accuracy``: the phrase heatmap's peak lies inside its finding's lesion
      (pointing, ties shared), over every localised phrase; ``…_multi_finding`` over studies
      with several localised findings; each with its chance level (the lesion's area fraction).
    * ``text_region_discrimination``: in studies with several findings, the share of (phrase,
      other finding) pairs where the phrase's mean heat over its own lesion exceeds that over
      the other lesion (ties, up to float noise, count ½; chance ½).

    Example:
        >>> scores = TextAlignmentScores()
        >>> own, other = np.array([[True, False]]), np.array([[False, True]])
        >>> scores.add("Edema", np.array([[0.9, 0.1]]), {"Edema": own, "Pneumothorax": other})
        >>> summary = scores.summary()
        >>> summary["text_alignment_accuracy_multi_finding"], summary["text_region_discrimination"]
        (1.0, 1.0)
    """

    _pointing: list[tuple[float, float, bool]] = field(default_factory=list, init=False)
    _discrimination: list[float] = field(default_factory=list, init=False)

    def add(self, label: str, heatmap: np.ndarray, regions: Mapping[str, np.ndarray]) -> None:
        """Score the heatmap of ``label``'s phrase against the study's lesions (``regions[label]`` its own)."""
        own = regions[label]
        multi = len(regions) > 1
        self._pointing.append((pointing_score(heatmap, own), float(own.mean()), multi))
        for other_label, other in regions.items():
            if other_label == label:
                continue
            own_only, other_only = own & ~other, other & ~own
            if not own_only.any() or not other_only.any():
                continue
            own_heat, other_heat = float(heatmap[own_only].mean()), float(heatmap[other_only].mean())
            tied = abs(own_heat - other_heat) <= PEAK_TOLERANCE * float(np.abs(heatmap).max())
            self._discrimination.append(0.5 if tied else float(own_heat > other_heat))

    def summary(self) -> dict[str, float | int]:
        """The scores above, their chance levels and counts (``nan`` when there is nothing to score)."""
        table = np.asarray(self._pointing, dtype=np.float64).reshape(-1, 3)
        multi = table[table[:, 2] > 0]
        return {
            "text_alignment_accuracy": _mean(table[:, 0]),
            "chance_text_alignment_accuracy": _mean(table[:, 1]),
            "num_phrases": len(table),
            "text_alignment_accuracy_multi_finding": _mean(multi[:, 0]),
            "chance_text_alignment_accuracy_multi_finding": _mean(multi[:, 1]),
            "num_phrases_multi_finding": len(multi),
            "text_region_discrimination": _mean(np.asarray(self._discrimination)),
            "chance_text_region_discrimination": 0.5 if self._discrimination else float("nan"),
            "num_region_pairs": len(self._discrimination),
        }


def phrase_image_ranking(
    phrases: torch.Tensor, phrase_images: Sequence[int], candidates: torch.Tensor, negatives: np.ndarray
) -> float:
    """How often a phrase is closer to its own image than to an image without its finding.

    Args:
        phrases: ``[K, P]`` normalised phrase embeddings.
        phrase_images: Row of ``candidates`` each phrase comes from.
        candidates: ``[M, P]`` normalised image embeddings.
        negatives: ``[K, M]`` boolean: image ``m`` is known not to have phrase ``k``'s finding.

    Returns:
        The share of (phrase, negative image) pairs ranked correctly (ties ½; chance ½), ``nan``
        when there is no pair.

    Example:
        >>> images = torch.eye(3)
        >>> phrase_image_ranking(torch.tensor([[1.0, 0.0, 0.0]]), [0], images, np.array([[False, True, True]]))
        1.0
    """
    similarity = (phrases @ candidates.T).detach().cpu().numpy()
    own = similarity[np.arange(len(phrase_images)), np.asarray(phrase_images, dtype=np.int64)]
    wins = (similarity < own[:, None]) + 0.5 * (similarity == own[:, None])
    return _mean(wins[np.asarray(negatives, dtype=bool)])


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
