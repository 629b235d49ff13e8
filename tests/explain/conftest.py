"""Fixtures for the explainer: a tiny real LeukemiaModule (3x3 patches, 8 words), a planted
model that looks at one patch and one word, and a few synthetic patients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedvlm.config import load_config
from fedvlm.data.prepared import Bundle
from fedvlm.explain.shapley import TokenVocabulary
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.leukemia.module import LeukemiaModule
from fedvlm.tasks.leukemia.records import LeukemiaRecord, prepare_bundle
from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig, generate_leukemia_with_truth, report_vocabulary

TINY_IMAGE = 24
"""With vit_micro's 8-pixel patches: a 3x3 grid, 9 players (exact Shapley in 512 evaluations)."""
TINY_TEXT = 10
"""[CLS] + 8 words + [SEP]."""
GENERATED_IMAGE = 32


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Explaining runs thousands of tiny forwards; on a shared CPU, one thread is several times
    faster than two threads that spin waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Patients:
    records: list[LeukemiaRecord]
    bundle: Bundle
    vocabulary: TokenVocabulary
    vocab_size: int


@pytest.fixture(scope="session")
def word_tokenizer():  # type: ignore[no-untyped-def]
    return build_word_tokenizer(report_vocabulary())


@pytest.fixture(scope="session")
def patients(word_tokenizer) -> Patients:  # type: ignore[no-untyped-def]
    records, _, _ = generate_leukemia_with_truth(SynthLeukemiaConfig(n=6, image_size=GENERATED_IMAGE, seed=1))
    bundle = prepare_bundle(records, word_tokenizer, TINY_IMAGE, TINY_TEXT)
    return Patients(records, bundle, TokenVocabulary.from_tokenizer(word_tokenizer), len(word_tokenizer))


@pytest.fixture
def tiny_module(patients: Patients) -> Callable[[], LeukemiaModule]:
    """Builds the demo architecture (vit_micro + bert_micro, concat fusion) at 24 px."""
    return lambda: _tiny_module(patients.vocab_size)


@pytest.fixture
def planted() -> type[PlantedModule]:
    return PlantedModule


def _tiny_module(vocab_size: int, seed: int = 0) -> LeukemiaModule:
    torch.manual_seed(seed)
    cfg = load_config("leukemia_demo", ["model.dropout=0.0"])
    return LeukemiaModule(
        OmegaConf.to_container(cfg.model),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.optim),  # type: ignore[arg-type]
        image_size=TINY_IMAGE,
        vocab_size=vocab_size,
    )


class _Grid(nn.Module):
    """Only carries the patch grid, as fedvlm's ImageEncoder does."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.patch_grid = grid


class PlantedModule(nn.Module):
    """Detection looks at one patch only (its mean red value), the stage head at one word only
    (whether token ``word_id`` is present and attended).

    Args:
        grid: Patch grid ``(rows, cols)`` of the square images.
        patch: Row-major index of the patch the detection head reads.
        word_id: Token id the stage head looks for.
    """

    def __init__(self, grid: tuple[int, int], patch: int, word_id: int) -> None:
        super().__init__()
        self.image_encoder = _Grid(grid)
        self.text_encoder = nn.Identity()
        self.grid = grid
        self.patch = patch
        self.word_id = word_id
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        rows, cols = self.grid
        patch_h, patch_w = image.shape[-2] // rows, image.shape[-1] // cols
        r, c = divmod(self.patch, cols)
        red = image[:, 0, r * patch_h : (r + 1) * patch_h, c * patch_w : (c + 1) * patch_w].mean(dim=(-2, -1))
        present = ((batch["input_ids"] == self.word_id) & (batch["attention_mask"] > 0)).any(dim=1).float()
        stage_logits = torch.stack([torch.zeros_like(present), self.scale * present - 1.0], dim=1)
        return self.scale * red, stage_logits
