"""Shapley values: brute force against a reference, shap against brute force, efficiency, planted models."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
import torch

from fedvlm.errors import ConfigError, DataError
from fedvlm.explain.shapley import (
    EXACT_MAX_FEATURES,
    ExplainSettings,
    TokenVocabulary,
    exact_shapley,
    fused_profile,
    image_baseline,
    kernel_shapley,
    patch_grid,
    permutation_shapley,
    word_players,
)
from fedvlm.tasks.leukemia.explain import explain_patients


def random_game(num_features: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """A game with arbitrary values on every coalition (all interactions), two outputs."""
    table = np.random.default_rng(seed).normal(size=(2**num_features, 2))

    def game(coalitions: np.ndarray) -> np.ndarray:
        codes = (np.asarray(coalitions, dtype=np.int64) << np.arange(num_features)).sum(axis=1)
        return table[codes]

    return game


def shapley_by_orderings(game, num_features: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Reference: the average marginal contribution over all M! orderings."""
    phi = np.zeros((num_features, 2))
    for order in permutations(range(num_features)):
        coalition = np.zeros((1, num_features), dtype=bool)
        before = game(coalition)[0]
        for player in order:
            coalition[0, player] = True
            after = game(coalition)[0]
            phi[player] += after - before
            before = after
    return phi / math.factorial(num_features)


def test_exact_shapley_matches_the_average_over_all_orderings() -> None:
    game = random_game(5)
    result = exact_shapley(game, 5)
    np.testing.assert_allclose(result.values, shapley_by_orderings(game, 5), atol=1e-12)
    assert result.model_evals == 32


@pytest.mark.parametrize("estimator", ["permutation", "kernel"])
def test_shap_estimators_are_efficient_and_close_to_exact_on_a_random_game(estimator: str) -> None:
    game = random_game(6, seed=1)
    exact = exact_shapley(game, 6).values
    ends = game(np.array([[True] * 6, [False] * 6]))
    if estimator == "kernel":
        result = kernel_shapley(game, 6, max_evals=64, seed=0)  # enumerates every coalition: exact
        np.testing.assert_allclose(result.values, exact, atol=1e-8)
    else:
        result = permutation_shapley(game, 6, max_evals=13 * 400, seed=0)
        np.testing.assert_allclose(result.values, exact, atol=0.1)
        assert result.model_evals == 13 * 400
    np.testing.assert_allclose(result.values.sum(axis=0), ends[0] - ends[1], atol=1e-8)


def test_permutation_spends_whole_antithetic_pairs_and_at_least_one() -> None:
    assert permutation_shapley(random_game(4), 4, max_evals=3, seed=0).model_evals == 9
    assert permutation_shapley(random_game(4), 4, max_evals=30, seed=0).model_evals == 27


def test_exact_refuses_games_too_large_to_enumerate() -> None:
    with pytest.raises(ConfigError, match="method=permutation"):
        exact_shapley(random_game(2), EXACT_MAX_FEATURES + 1)


def test_sampling_leaves_the_global_numpy_stream_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    permutation_shapley(random_game(4), 4, max_evals=50, seed=7)
    assert np.random.random() == expected


@pytest.mark.parametrize("image_baseline_name", ["mean", "blur", "black"])
def test_on_a_tiny_leukemia_module_shap_equals_brute_force_on_both_modalities(
    patients, image_baseline_name: str, tiny_module
) -> None:
    module = tiny_module()
    bundle = {k: v[:1] for k, v in patients.bundle.items()}
    common = {"image_baseline": image_baseline_name, "text_baseline": "mask"}
    exact = explain_patients(module, bundle, ExplainSettings(method="exact", **common), patients.vocabulary)[0]
    kernel = explain_patients(
        module, bundle, ExplainSettings(method="kernel", max_evals=512, **common), patients.vocabulary
    )[0]
    permutation = explain_patients(
        module, bundle, ExplainSettings(method="permutation", max_evals=19 * 150, **common), patients.vocabulary
    )[0]
    assert exact.image is not None and exact.text is not None
    assert len(exact.image.features) == 9 and len(exact.text.features) == 8
    assert exact.image.model_evals == 2**9 + 2
    for modality in ("image", "text"):
        reference = getattr(exact, modality)
        for head in ("detection", "stage"):
            phi = reference.attributions[head]
            scale = np.abs(phi).max() + 1e-9
            np.testing.assert_allclose(getattr(kernel, modality).attributions[head], phi, atol=1e-6)  # float32 rounding
            np.testing.assert_allclose(getattr(permutation, modality).attributions[head], phi, atol=0.15 * scale)
            for explanation in (exact, kernel, permutation):
                assert getattr(explanation, modality).efficiency_error[head] < 1e-6


def test_efficiency_is_returned_against_the_actual_prediction(patients, tiny_module) -> None:
    module = tiny_module()
    bundle = {k: v[:2] for k, v in patients.bundle.items()}
    for explanation in explain_patients(module, bundle, ExplainSettings(max_evals=300), patients.vocabulary):
        assert explanation.image is not None and explanation.text is not None
        for modality in (explanation.image, explanation.text):
            assert modality.full_value["detection"] == pytest.approx(explanation.leukemia_probability, abs=1e-5)
            predicted = explanation.stage_probabilities[explanation.predicted_stage]
            assert modality.full_value["stage"] == pytest.approx(predicted, abs=1e-5)
            for head, phi in modality.attributions.items():
                gap = modality.full_value[head] - modality.baseline_value[head]
                assert phi.sum() == pytest.approx(gap, abs=1e-6)
                assert modality.efficiency_error[head] < 1e-6


def test_explaining_restores_mode_grad_mode_and_encoders(patients, tiny_module) -> None:
    module = tiny_module()
    encoders = (module.image_encoder, module.text_encoder)
    bundle = {k: v[:1] for k, v in patients.bundle.items()}
    for training in (True, False):
        module.train(training)
        explain_patients(module, bundle, ExplainSettings(max_evals=100), patients.vocabulary)
        assert module.training is training and torch.is_grad_enabled()
        assert (module.image_encoder, module.text_encoder) == encoders


def planted_bundle(image_size: int, input_ids: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randint(0, 256, (1, 3, image_size, image_size), generator=generator, dtype=torch.uint8),
        "input_ids": torch.tensor([input_ids], dtype=torch.int32),
        "attention_mask": torch.ones(1, len(input_ids), dtype=torch.uint8),
        "index": torch.tensor([7]),
    }


def planted_vocabulary(size: int) -> TokenVocabulary:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(5, size))]
    return TokenVocabulary(tokens, mask_token_id=4, special_ids=frozenset({0, 1, 2, 3}))


@pytest.mark.parametrize(("method", "text_baseline"), [("exact", "mask"), ("permutation", "remove")])
def test_a_model_looking_at_one_patch_and_one_word_is_explained_by_them(
    method: str, text_baseline: str, planted
) -> None:
    small = method == "exact"
    grid, patch = ((3, 3), 5) if small else ((8, 8), 37)
    words = list(range(5, 13 if small else 40))
    module = planted(grid, patch, word_id=9)
    bundle = planted_bundle(8 * grid[0], [2, *words, 3])
    settings = ExplainSettings(method=method, max_evals=600, text_baseline=text_baseline, image_baseline="black")
    explanation = explain_patients(module, bundle, settings, planted_vocabulary(64))[0]
    assert explanation.patient == "00007"
    image, text = explanation.image, explanation.text
    assert image is not None and text is not None and image.grid == grid
    detection = image.attributions["detection"]
    assert int(np.argmax(np.abs(detection))) == patch
    assert np.abs(np.delete(detection, patch)).max() < 1e-9  # other patches do not matter at all
    assert np.abs(image.attributions["stage"]).max() < 1e-9  # the stage head ignores the image
    stage = text.attributions["stage"]
    assert text.features[int(np.argmax(stage))] == "w9"
    assert stage.sum() == pytest.approx(text.full_value["stage"] - text.baseline_value["stage"], abs=1e-7)
    assert np.abs(np.delete(stage, words.index(9))).max() < 1e-9
    assert np.abs(text.attributions["detection"]).max() < 1e-9


def test_word_pieces_join_their_word_and_special_tokens_are_not_players() -> None:
    vocabulary = TokenVocabulary(
        ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "leuk", "##emia", "##s", "no", "45", "%"],
        mask_token_id=3,
        special_ids=frozenset({0, 1, 2}),
    )
    words, positions = word_players([1, 7, 4, 5, 6, 8, 9, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0], vocabulary)
    assert words == ["no", "leukemias", "45", "%"]
    assert positions == [[1], [2, 3, 4], [5], [6]]
    with pytest.raises(DataError, match="outside the vocabulary"):
        word_players([1, 99], [1, 1], vocabulary)


def test_our_word_tokenizer_gives_one_player_per_word(patients, word_tokenizer) -> None:
    row = patients.bundle["input_ids"][0].tolist()
    words, _ = word_players(row, patients.bundle["attention_mask"][0].tolist(), patients.vocabulary)
    assert words == word_tokenizer.convert_ids_to_tokens(row)[1:-1]


def test_baselines_and_the_patch_grid(patients, tiny_module) -> None:
    module = tiny_module()
    assert patch_grid(module) == (3, 3)
    image = torch.randn(3, 24, 24)
    mean = image_baseline(image, (3, 3), "mean")
    torch.testing.assert_close(mean[:, 5, 7], image.mean(dim=(1, 2)))
    blurred = image_baseline(image, (3, 3), "blur")
    assert blurred.shape == image.shape and blurred.std() < image.std()
    black = image_baseline(image, (3, 3), "black")
    torch.testing.assert_close(
        black[:, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])
    )
    with pytest.raises(ConfigError, match="no ViT patch grid"):
        patch_grid(torch.nn.Module())


def test_settings_and_inputs_are_checked(patients, tiny_module) -> None:
    with pytest.raises(ConfigError, match="image_baseline='noise' is not one of: mean, blur, black"):
        ExplainSettings(image_baseline="noise")
    with pytest.raises(ConfigError, match="method"):
        ExplainSettings(method="lime")
    with pytest.raises(ConfigError, match="max_evals"):
        ExplainSettings(max_evals=0)
    module = tiny_module()
    with pytest.raises(ConfigError, match="tokenizer"):
        explain_patients(module, patients.bundle, ExplainSettings(), vocabulary=None)
    no_mask = TokenVocabulary(patients.vocabulary.tokens, None, patients.vocabulary.special_ids)
    with pytest.raises(ConfigError, match="text_baseline=remove"):
        explain_patients(module, {k: v[:1] for k, v in patients.bundle.items()}, ExplainSettings(), no_mask)


def test_fused_profile_is_eq_23_concatenation_of_weighted_unit_vectors() -> None:
    image, text = np.array([0.0, 3.0, -4.0]), np.array([1.0, 1.0])
    profile = fused_profile(image, text, image_weight=0.25)
    np.testing.assert_allclose(profile, [0.0, 0.15, -0.2, 0.75 / math.sqrt(2), 0.75 / math.sqrt(2)])
    assert np.linalg.norm(profile[:3]) == pytest.approx(0.25)
    np.testing.assert_array_equal(fused_profile(np.zeros(2), text, 1.0)[:2], [0.0, 0.0])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        fused_profile(image, text, 1.5)


def test_the_modality_held_fixed_is_encoded_once_not_per_coalition(patients, tiny_module) -> None:
    module = tiny_module()
    rows: list[int] = []
    module.text_encoder.register_forward_hook(lambda _, inputs, __: rows.append(inputs[0].shape[0]))
    bundle = {k: v[:1] for k, v in patients.bundle.items()}
    explanation = explain_patients(module, bundle, ExplainSettings(method="exact"), patients.vocabulary)[0]
    assert explanation.image is not None and explanation.image.model_evals == 2**9 + 2
    assert sum(rows) < 2**9  # the 514 image coalitions reused one embedding of the report
