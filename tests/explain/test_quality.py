"""Quality metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedvlm.errors import ConfigError, DataError
from fedvlm.explain import quality


def test_top_k_ranks_by_magnitude_with_ties_to_the_lower_index() -> None:
    assert quality.top_k(np.array([0.2, -0.9, 0.2, 0.5]), 3).tolist() == [1, 3, 0]
    assert quality.top_k(np.array([1.0, 2.0]), 5).tolist() == [1, 0]
    with pytest.raises(ConfigError, match="top_k must be >= 1"):
        quality.top_k(np.ones(3), 0)


def test_jaccard_and_consistency() -> None:
    a = np.array([5.0, 4.0, 3.0, 0.0, 0.0])  # top-3 {0, 1, 2}
    b = np.array([5.0, 0.0, 3.0, -4.0, 0.0])  # top-3 {0, 2, 3}
    c = np.array([0.0, 0.0, 1.0, 2.0, 3.0])  # top-3 {2, 3, 4}
    assert quality.top_k_jaccard(a, b, 3) == pytest.approx(2 / 4)
    assert quality.top_k_jaccard(a, c, 3) == pytest.approx(1 / 5)
    assert quality.top_k_jaccard(b, c, 3) == pytest.approx(2 / 4)
    assert quality.consistency([a, b, c], 3) == pytest.approx((0.5 + 0.2 + 0.5) / 3)
    assert quality.consistency([a, a * 2], 3) == 1.0
    with pytest.raises(DataError, match="at least two"):
        quality.consistency([a], 3)
    with pytest.raises(DataError, match="5 and 2 players"):
        quality.top_k_jaccard(a, np.ones(2), 1)


def test_sparsity_counts_and_top_k_mass() -> None:
    phi = np.array([0.6, -0.2, 0.1, 0.095, 0.005])  # Σ|φ| = 1
    assert quality.active_features(phi) == 4  # 0.005 < 1 % of the mass
    assert quality.active_features(phi, negligible_share=0.15) == 2
    assert quality.top_k_mass(phi, 2) == pytest.approx(0.8)
    assert quality.active_features(np.zeros(3)) == 0 and quality.top_k_mass(np.zeros(3), 1) == 0.0


def test_patches_containing_points_on_a_2x3_grid() -> None:
    # 20 px high, 30 px wide: patches are 10x10; (x, y) = (25, 15) is row 1, column 2.
    mask = quality.patches_containing([(25.0, 15.0), (0.0, 0.0), (9.9, 9.9)], (20, 30), (2, 3))
    assert mask.tolist() == [True, False, False, False, False, True]
    with pytest.raises(DataError, match="outside"):
        quality.patches_containing([(30.0, 1.0)], (20, 30), (2, 3))


def test_chance_rate_is_hypergeometric() -> None:
    assert quality.chance_hit_rate(10, 2, 3) == pytest.approx(1 - math.comb(8, 3) / math.comb(10, 3))  # 8/15
    assert quality.chance_hit_rate(10, 0, 3) == 0.0
    assert quality.chance_hit_rate(3, 1, 5) == 1.0  # k larger than M draws everything


def test_ground_truth_agreement_counts_only_patients_with_a_relevant_player() -> None:
    phi = [np.array([0.1, 0.9, 0.0, 0.0]), np.array([0.9, 0.1, 0.0, 0.5]), np.array([0.0, 0.0, 0.0, 1.0])]
    relevant = [np.array([0, 1, 0, 0], bool), np.array([0, 0, 1, 0], bool), np.zeros(4, bool)]
    agreement = quality.ground_truth_agreement(phi, relevant, k=2)
    # patient 0: top-2 {1, 0} holds player 1 (hit); patient 1: top-2 {0, 3} misses player 2.
    assert agreement == quality.GroundTruthAgreement(hit_rate=0.5, chance_rate=0.5, patients=2)
    empty = quality.ground_truth_agreement(phi[2:], relevant[2:], k=2)
    assert empty.patients == 0 and math.isnan(empty.hit_rate)
    with pytest.raises(DataError, match="ground-truth mask of 3"):
        quality.ground_truth_agreement([np.ones(4)], [np.ones(3, bool)], k=1)


def test_signal_words_match_case_insensitively() -> None:
    words = ["smear", "review", ":", "45", "%", "blasts", "."]
    assert np.flatnonzero(quality.words_matching(words, ("Blasts", "45"))).tolist() == [3, 5]
