"""Quality of explanations: consistency, sparsity and agreement with the ground truth.

Pure functions on attribution vectors (``φ`` ``[M]``). "Top k" always ranks players by
``|φ|`` (the most influential, whichever way they push), ties broken by the lower index.

* **Consistency**: the Jaccard index of the top-k sets of two explanations of the same patient
  (bootstrap resamples of the estimator, or successive federated rounds).
* **Sparsity**: how many attributions are non-negligible, and the share of ``Σ|φ|`` in the top k.
* **Ground truth** (synthetic data): whether the top-k patches contain a blast centre and the
  top-k words a signal word, against the rate a random choice of k players would reach.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fedvlm.errors import ConfigError, DataError

NEGLIGIBLE_SHARE = 0.01
"""An attribution is negligible when ``|φ_i|`` is below this share of ``Σ|φ|``."""


def top_k(attributions: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``|φ|`` (fewer when there are fewer players), largest first.

    Example:
        >>> top_k(np.array([0.1, -0.5, 0.3, 0.5]), 2).tolist()
        [1, 3]
    """
    _check_k(k)
    magnitude = np.abs(np.asarray(attributions, dtype=np.float64))
    order = np.argsort(-magnitude, kind="stable")
    return order[: min(k, len(order))]


def top_k_jaccard(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """Jaccard index ``|A ∩ B| / |A ∪ B|`` of the top-k sets of two explanations of one patient.

    Raises:
        DataError: If the two have a different number of players.

    Example:
        >>> top_k_jaccard(np.array([3.0, 2.0, 1.0, 0.0]), np.array([3.0, 0.0, 2.0, 1.0]), 2)
        0.3333333333333333
    """
    if len(first) != len(second):
        raise DataError(f"cannot compare explanations over {len(first)} and {len(second)} players")
    a, b = set(top_k(first, k).tolist()), set(top_k(second, k).tolist())
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def consistency(resamples: Sequence[np.ndarray], k: int) -> float:
    """Mean pairwise top-k Jaccard index over explanations of one patient (bootstrap resamples,
    estimator seeds or rounds); 1 when every top-k set is the same.

    Raises:
        DataError: With fewer than two explanations.
    """
    if len(resamples) < 2:
        raise DataError(f"consistency needs at least two explanations, got {len(resamples)}")
    return float(np.mean([top_k_jaccard(a, b, k) for a, b in combinations(resamples, 2)]))


def active_features(attributions: np.ndarray, negligible_share: float = NEGLIGIBLE_SHARE) -> int:
    """Number of non-negligible attributions: ``|φ_i| ≥ negligible_share · Σ|φ|`` (0 when all are 0).

    Example:
        >>> active_features(np.array([0.5, -0.3, 0.004, 0.196]))
        3
    """
    magnitude = np.abs(np.asarray(attributions, dtype=np.float64))
    total = magnitude.sum()
    return int((magnitude >= negligible_share * total).sum()) if total > 0 else 0


def top_k_mass(attributions: np.ndarray, k: int) -> float:
    """Share of ``Σ|φ|`` held by the top k (1 for a perfectly sparse explanation; 0 when all are 0).

    Example:
        >>> top_k_mass(np.array([0.5, -0.3, 0.1, 0.1]), 1)
        0.5
    """
    magnitude = np.abs(np.asarray(attributions, dtype=np.float64))
    total = magnitude.sum()
    return float(magnitude[top_k(magnitude, k)].sum() / total) if total > 0 else 0.0


def patches_containing(
    points: Iterable[tuple[float, float]], image_size: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """Which patches of a ``rows × cols`` grid contain at least one point.

    Args:
        points: ``(x, y)`` pixel coordinates in an image of ``image_size``.
        image_size: ``(height, width)`` of the image the points refer to (patches are scaled to it).
        grid: ``(rows, cols)``; patch ``r * cols + c`` is row ``r``, column ``c``.

    Returns:
        Boolean ``[rows * cols]``.

    Example:
        >>> patches_containing([(3.0, 1.0), (15.9, 8.0)], (16, 16), (2, 2)).tolist()
        [True, False, False, True]
    """
    height, width = image_size
    rows, cols = grid
    hit = np.zeros(rows * cols, dtype=bool)
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise DataError(f"point ({x}, {y}) lies outside the {height}x{width} image")
        hit[int(y * rows / height) * cols + int(x * cols / width)] = True
    return hit


def words_matching(words: Sequence[str], signal_words: Iterable[str]) -> np.ndarray:
    """Which report words are signal words (case-insensitive).

    Example:
        >>> words_matching(["peripheral", "blasts", "45", "%"], ("Blasts", "45")).tolist()
        [False, True, True, False]
    """
    wanted = {word.lower() for word in signal_words}
    return np.array([word.lower() in wanted for word in words], dtype=bool)


def chance_hit_rate(num_features: int, num_relevant: int, k: int) -> float:
    """P(k players drawn at random without replacement include a relevant one):
    ``1 − C(M − R, k) / C(M, k)``.

    Example:
        >>> chance_hit_rate(4, 1, 2)
        0.5
    """
    _check_k(k)
    if not 0 <= num_relevant <= num_features:
        raise DataError(f"{num_relevant} relevant players out of {num_features}")
    drawn = min(k, num_features)
    if num_features == 0:
        return 0.0
    return 1.0 - math.comb(num_features - num_relevant, drawn) / math.comb(num_features, drawn)


@dataclass(frozen=True)
class GroundTruthAgreement:
    """How often the top k contain a relevant player, and how often chance would.

    Attributes:
        hit_rate: Share of patients whose top k contain a relevant player.
        chance_rate: Mean over the same patients of :func:`chance_hit_rate`.
        patients: Patients counted (those with at least one relevant player).
    """

    hit_rate: float
    chance_rate: float
    patients: int


def ground_truth_agreement(
    attributions: Sequence[np.ndarray], relevant: Sequence[np.ndarray], k: int
) -> GroundTruthAgreement:
    """Share of patients whose top-k players include a relevant one (a patch with a blast centre,
    a signal word), and the chance rate. Patients with no relevant player are left out.

    Args:
        attributions: ``φ`` per patient.
        relevant: Boolean ``[M]`` per patient (from :func:`patches_containing` or :func:`words_matching`).
        k: Top-k size.

    Raises:
        DataError: If the lists or a patient's vectors differ in length.

    Example:
        >>> phi = [np.array([0.9, 0.1, 0.0, 0.0]), np.array([0.0, 0.1, 0.9, 0.0]), np.array([1.0, 0, 0, 0])]
        >>> masks = [np.array([1, 0, 0, 0], bool), np.array([1, 0, 0, 0], bool), np.zeros(4, bool)]
        >>> ground_truth_agreement(phi, masks, 1)
        GroundTruthAgreement(hit_rate=0.5, chance_rate=0.25, patients=2)
    """
    if len(attributions) != len(relevant):
        raise DataError(f"{len(attributions)} explanations but {len(relevant)} ground-truth masks")
    hits, chances = [], []
    for phi, mask in zip(attributions, relevant, strict=True):
        mask = np.asarray(mask, dtype=bool)
        if len(phi) != len(mask):
            raise DataError(f"an explanation over {len(phi)} players has a ground-truth mask of {len(mask)}")
        if not mask.any():
            continue
        hits.append(bool(mask[top_k(phi, k)].any()))
        chances.append(chance_hit_rate(len(mask), int(mask.sum()), k))
    if not hits:
        return GroundTruthAgreement(float("nan"), float("nan"), 0)
    return GroundTruthAgreement(float(np.mean(hits)), float(np.mean(chances)), len(hits))


def _check_k(k: int) -> None:
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {k}")
