"""Token↔region grounding: planted CNN and ViT towers, exact single-region checks, alignment scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.cxr.grounding import (
    TextAlignmentScores,
    grounding_maps,
    phrase_embeddings,
    phrase_heatmaps,
    phrase_image_ranking,
    region_embeddings,
)
from fedvlm.tasks.cxr.module import ContrastiveVLM

GRID = (2, 3)
IMAGE = (8, 12)
"""4x4-pixel regions on a 2x3 grid."""


class ConvFeatures(nn.Module):
    """A timm-like CNN: ``forward_features`` gives ``[B, K, 2, 3]``, a fixed random code per region
    scaled by the region's mean intensity, so each region has its own direction."""

    def __init__(self, channels: int = 5) -> None:
        super().__init__()
        codes = torch.randn(channels, *GRID, generator=torch.Generator().manual_seed(3))
        self.codes: torch.Tensor
        self.register_buffer("codes", codes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        intensity = nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), 4)
        return intensity * self.codes


class TokenFeatures(ConvFeatures):
    """A timm-like ViT: a class token, then the same codes as patch tokens, and an ``fc_norm``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_norm = nn.LayerNorm(5)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patches = super().forward_features(images).flatten(2).transpose(1, 2)
        return torch.cat([torch.full_like(patches[:, :1], 7.0), patches], dim=1)


class PlantedVlm(nn.Module):
    def __init__(self, backbone: nn.Module, patch_grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.backbone = backbone
        self.image_encoder.patch_grid = patch_grid  # type: ignore[assignment]
        self.image_projection = nn.Linear(5, 4, bias=False)
        torch.nn.init.normal_(self.image_projection.weight, generator=torch.Generator().manual_seed(4))


def images() -> torch.Tensor:
    return 0.5 + torch.rand(2, 3, *IMAGE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("backbone", "patch_grid"), [(ConvFeatures(), None), (TokenFeatures(), GRID)])
@pytest.mark.parametrize("region", [0, 4])
def test_a_phrase_equal_to_one_regions_embedding_grounds_in_that_region(
    backbone: nn.Module, patch_grid: tuple[int, int] | None, region: int
) -> None:
    module = PlantedVlm(backbone, patch_grid)
    regions, grid = region_embeddings(module, images())
    assert grid == GRID and regions.shape == (2, 6, 4)
    assert torch.allclose(regions.norm(dim=-1), torch.ones(2, 6))
    phrase = regions[0, region : region + 1].detach()
    coarse = grounding_maps(regions[0].detach(), phrase, grid)
    assert coarse.flatten().argmax() == region and coarse.flatten()[region] == pytest.approx(1.0)
    heatmaps = phrase_heatmaps(module, images()[:1], phrase)
    assert heatmaps.shape == (1, 1, *IMAGE)
    row, col = divmod(region, GRID[1])
    peak_row, peak_col = divmod(int(heatmaps[0, 0].argmax()), IMAGE[1])
    assert (peak_row // 4, peak_col // 4) == (row, col)


def test_vit_regions_drop_prefix_tokens_and_apply_fc_norm() -> None:
    backbone = TokenFeatures()
    module = PlantedVlm(backbone, GRID)
    with torch.no_grad():
        regions, _ = region_embeddings(module, images())
        tokens = ConvFeatures.forward_features(backbone, images()).flatten(2).transpose(1, 2)
        expected = nn.functional.normalize(module.image_projection(backbone.fc_norm(tokens)), dim=-1)
    assert torch.allclose(regions, expected, atol=1e-6)


def build(encoder: str, image_size: int) -> ContrastiveVLM:
    cfg = load_config(None, ["task=cxr", "model.dropout=0.0", f"model.image_encoder.name={encoder}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    torch.manual_seed(0)
    return ContrastiveVLM(
        container["model"], container["contrastive"], container["optim"], ("Edema",), image_size, 50
    ).eval()


@pytest.mark.parametrize(("encoder", "image_size"), [("vit_micro", 8), ("resnet_micro", 32)])
def test_a_single_region_embeds_exactly_as_the_whole_image(encoder: str, image_size: int) -> None:
    """One patch (ViT at its patch size) or a 1x1 map (ResNet at 32 px): pooling is the identity,
    so the region embedding must be the image embedding."""
    module = build(encoder, image_size)
    batch = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        regions, grid = region_embeddings(module, batch)
        assert grid == (1, 1)
        assert torch.allclose(regions[:, 0], module.embed_images(batch), atol=1e-5)


def test_phrases_are_embedded_alone_with_the_text_tower() -> None:
    module = build("vit_micro", 16)
    phrases = ["small left pleural effusion", "moderate cardiomegaly"]
    tokenizer = build_word_tokenizer(phrases)
    assert len(tokenizer) <= 50  # the module's vocabulary
    embedded = phrase_embeddings(module, tokenizer, phrases, max_text_length=8)
    tokens = tokenizer(phrases[1:], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        alone = module.embed_texts(tokens["input_ids"], tokens["attention_mask"])
    assert embedded.shape == (2, module.text_projection.out_features)  # type: ignore[union-attr]
    assert torch.allclose(embedded[1:], alone, atol=1e-5)


def test_image_only_models_have_no_regions_to_ground() -> None:
    class ImageOnly(nn.Module):
        image_projection = None

    with pytest.raises(ConfigError, match=r"model.modality=fused"):
        region_embeddings(ImageOnly(), images())


def test_text_alignment_scores_match_a_hand_computation() -> None:
    left, right, both = np.array([[True, False]]), np.array([[False, True]]), np.array([[True, True]])
    scores = TextAlignmentScores()
    scores.add("Edema", np.array([[0.2, 0.9]]), {"Edema": left, "Pneumothorax": right})  # misses, loses
    scores.add("Pneumothorax", np.array([[0.2, 0.9]]), {"Edema": left, "Pneumothorax": right})  # hits, wins
    scores.add("Edema", np.array([[0.5, 0.5]]), {"Edema": left})  # flat map: half a hit, single finding
    scores.add("Edema", np.array([[0.5, 0.1]]), {"Edema": both, "Pneumothorax": right})  # no own-only pixels
    summary = scores.summary()
    assert summary["text_alignment_accuracy"] == pytest.approx((0 + 1 + 0.5 + 1) / 4)
    assert summary["chance_text_alignment_accuracy"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)
    assert summary["text_alignment_accuracy_multi_finding"] == pytest.approx(2 / 3)
    assert summary["num_phrases_multi_finding"] == 3
    assert summary["text_region_discrimination"] == 0.5 and summary["num_region_pairs"] == 2


def test_an_empty_alignment_summary_is_nan() -> None:
    summary = TextAlignmentScores().summary()
    assert math.isnan(summary["text_alignment_accuracy"]) and summary["num_phrases"] == 0


def test_phrase_image_ranking_counts_pairs_against_images_without_the_finding() -> None:
    candidates = torch.eye(3)
    phrases = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    negatives = np.array([[False, True, True], [True, False, False]])
    # phrase 0 beats images 1 and 2 (1 > 0, 1 > 0); phrase 1 (own image 1: 0.6) against image 0 (0.0): a win
    assert phrase_image_ranking(phrases, [0, 1], candidates, negatives) == 1.0
    # the same phrase said to come from image 0 (0.0) loses to images 1 (0.6) and 2 (0.8)
    assert phrase_image_ranking(phrases[1:], [0], candidates, np.array([[False, True, True]])) == pytest.approx(0.0)
    assert math.isnan(phrase_image_ranking(phrases, [0, 1], candidates, np.zeros((2, 3), dtype=bool)))
