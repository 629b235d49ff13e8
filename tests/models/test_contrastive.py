"""ContrastiveVLM: InfoNCE against a hand-computed example, unimodal losses, zero-shot scores."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from fedvlm.config import load_config
from fedvlm.tasks.cxr.module import MAX_LOGIT_SCALE, ContrastiveVLM, info_nce, masked_bce

LABELS = ("Cardiomegaly", "Pleural Effusion")


def build(*overrides: str) -> ContrastiveVLM:
    cfg = load_config(None, ["task=cxr", *overrides])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    torch.manual_seed(0)
    return ContrastiveVLM(container["model"], container["contrastive"], container["optim"], LABELS, 32, 50)


def batch(size: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(size, 3, 32, 32, generator=generator),
        "input_ids": torch.randint(5, 50, (size, 12), generator=generator),
        "attention_mask": torch.ones(size, 12, dtype=torch.long),
        "labels": torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 0.0]])[:size],
    }


def test_info_nce_matches_a_hand_computed_3x3_example() -> None:
    r = 1 / math.sqrt(2)
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [r, 0, r]])
    # similarity s_ij = u_i · v_j:  [[1, 0, r], [0, 1, 0], [0, 0, r]]
    e = math.exp
    image_to_text = [
        -math.log(e(1) / (e(1) + e(0) + e(r))),
        -math.log(e(1) / (e(0) + e(1) + e(0))),
        -math.log(e(r) / (e(0) + e(0) + e(r))),
    ]
    text_to_image = [  # columns of s
        -math.log(e(1) / (e(1) + e(0) + e(0))),
        -math.log(e(1) / (e(0) + e(1) + e(0))),
        -math.log(e(r) / (e(r) + e(0) + e(r))),
    ]
    expected = 0.5 * (sum(image_to_text) / 3 + sum(text_to_image) / 3)
    assert float(info_nce(images, texts, torch.tensor(1.0))) == pytest.approx(expected, abs=1e-6)
    # the temperature divides every similarity: scale 2 equals doubling the embeddings' products
    doubled = (
        0.5
        * sum(
            -math.log(e(2 * s[i]) / sum(e(2 * x) for x in s))
            for s, i in [([1, 0, r], 0), ([0, 1, 0], 1), ([0, 0, r], 2), ([1, 0, 0], 0), ([0, 1, 0], 1), ([r, 0, r], 2)]
        )
        / 3
    )
    assert float(info_nce(images, texts, torch.tensor(2.0))) == pytest.approx(doubled, abs=1e-6)


def test_info_nce_is_symmetric_in_the_two_modalities() -> None:
    generator = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    assert float(info_nce(u, v, torch.tensor(3.0))) == pytest.approx(float(info_nce(v, u, torch.tensor(3.0))))


def test_masked_bce_skips_unknown_labels() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0])
    )
    assert float(masked_bce(logits, labels)) == pytest.approx(float(expected))
    assert float(masked_bce(logits, torch.full_like(labels, float("nan")))) == 0.0


def test_loss_adds_weighted_unimodal_terms() -> None:
    module = build("contrastive.image_loss_weight=0.5", "contrastive.text_loss_weight=0.25")
    module.eval()  # no dropout: the parts recombine exactly
    losses = module.compute_loss(batch())
    expected = losses["contrastive_loss"] + 0.5 * losses["image_loss"] + 0.25 * losses["text_loss"]
    assert float(losses["loss"].detach()) == pytest.approx(float(expected.detach()))
    plain = build()
    assert set(plain.compute_loss(batch())) == {"contrastive_loss", "loss"}


def test_temperature_initialises_from_config_and_is_clamped() -> None:
    module = build("contrastive.temperature=0.05")
    assert float(module.scale()) == pytest.approx(20.0)
    with torch.no_grad():
        module.logit_scale.fill_(10.0)
    assert float(module.scale()) == MAX_LOGIT_SCALE
    assert not build("contrastive.learn_temperature=false").logit_scale.requires_grad


def test_zero_shot_probability_is_the_softmax_over_the_prompt_pair() -> None:
    module = build()
    module.eval()
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    prompts = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    scale = float(module.scale())
    probabilities = module.zero_shot_probabilities(image, prompts)
    expected_first = math.exp(scale) / (math.exp(scale) + 1.0)
    assert probabilities.shape == (1, 2)
    assert float(probabilities[0, 0]) == pytest.approx(expected_first)
    assert float(probabilities[0, 1]) == pytest.approx(0.5)  # equally far from both prompts


def test_prompt_ensembles_average_the_normalised_phrasings_and_skip_absent_ones() -> None:
    module = build()
    module.eval()
    generator = torch.Generator().manual_seed(2)
    phrasings = torch.randint(5, 50, (2, 2, 3, 6), generator=generator)
    mask = torch.ones_like(phrasings)
    mask[0, 1, 2] = 0  # label 0's negative side has two phrasings, not three
    mask[1, :, 1:] = 0  # label 1 is a plain pair
    module.set_prompts(phrasings, mask)
    with torch.no_grad():
        ensemble = module.prompt_embeddings()
        for c, k, count in [(0, 0, 3), (0, 1, 2), (1, 0, 1), (1, 1, 1)]:
            each = module.embed_texts(phrasings[c, k, :count], mask[c, k, :count])
            expected = torch.nn.functional.normalize(each.mean(dim=0), dim=-1)
            torch.testing.assert_close(ensemble[c, k], expected)
        # a [C, 2, L] pair is the one-phrasing case
        module.set_prompts(phrasings[:, :, 0], mask[:, :, 0])
        pairs = module.prompt_embeddings()
        torch.testing.assert_close(pairs[1], ensemble[1])
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        mask[1, 1] = 0
        module.set_prompts(phrasings, mask)


def test_set_prompts_checks_one_pair_per_label() -> None:
    module = build()
    with pytest.raises(ValueError, match="num_labels=2"):
        module.set_prompts(torch.zeros(3, 2, 5, dtype=torch.long), torch.ones(3, 2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="set_prompts"):
        module.prompt_embeddings()


@pytest.mark.parametrize("modality", ["image", "text"])
def test_unimodal_baselines_train_their_label_head_only(modality: str) -> None:
    module = build(f"model.modality={modality}")
    assert module.image_projection is None and module.text_projection is None
    assert (module.image_encoder is None) == (modality == "text")
    losses = module.compute_loss(batch())
    assert set(losses) == {f"{modality}_loss", "loss"}
    assert float(losses["loss"]) == pytest.approx(float(losses[f"{modality}_loss"]))
    probabilities = module.label_probabilities(batch())["probabilities"]
    assert probabilities.shape == (4, 2) and bool(((probabilities > 0) & (probabilities < 1)).all())


def test_a_training_step_moves_the_embeddings_of_pairs_together() -> None:
    module = build("model.dropout=0.0")
    data = batch()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    before = float(module.compute_loss(data)["contrastive_loss"])
    for _ in range(30):
        optimizer.zero_grad()
        module.compute_loss(data)["loss"].backward()
        optimizer.step()
    assert float(module.compute_loss(data)["contrastive_loss"]) < 0.5 * before


def test_per_sample_masked_bce_sums_known_terms_over_all_entries() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]), reduction="sum"
        )
        / 4
    )
    assert float(masked_bce(logits, labels, per_sample=True)) == pytest.approx(float(expected))
    (gradient,) = torch.autograd.grad(masked_bce(logits, labels, per_sample=True), logits)
    fewer = labels.clone()
    fewer[1, 1] = float("nan")  # another record's label becomes unknown
    (again,) = torch.autograd.grad(masked_bce(logits, fewer, per_sample=True), logits)
    torch.testing.assert_close(again[0], gradient[0])
