"""Shapley values of coalition games over image patches and report words, and the baselines
that make a player absent.

A game maps boolean coalitions ``[N, M]`` (True: the player keeps its actual value) to values
``[N, K]``, one column per explained output. Players are image patches or report words:

* **Image.** A patch outside the coalition is painted with the image's mean colour (``mean``), a
  Gaussian-blurred copy of itself (``blur``) or black (``black``) (:func:`image_baseline`).
* **Text.** A word outside the coalition has all its word pieces replaced by ``[MASK]``
  (``mask``) or is dropped from attention and pooling (``remove``) (:func:`word_players`).

Shapley values are computed exactly for small games (every coalition, Eq. 21 of Fed-MMX) and
otherwise estimated by ``shap``'s permutation explainer (antithetic permutations, so that
efficiency ``Σ φ_i = f(x) − f(baseline)`` holds exactly whatever the budget) or its kernel
explainer. The leukemia task's per-patient games are :mod:`fedvlm.tasks.leukemia.explain`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import IMAGENET_MEAN, IMAGENET_STD
from fedvlm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_BASELINES = ("mean", "blur", "black")
TEXT_BASELINES = ("mask", "remove")
METHODS = ("auto", "exact", "permutation", "kernel")
EXACT_MAX_FEATURES = 12
"""The exact path enumerates ``2^M`` coalitions; beyond this it is refused."""
WORD_PIECE_PREFIX = "##"

CoalitionGame = Callable[[np.ndarray], np.ndarray]
"""Boolean coalitions ``[N, M]`` (True: the player keeps its actual value) → values ``[N, K]``."""


@dataclass(frozen=True)
class ExplainSettings:
    """How patients are explained.

    Attributes:
        image_baseline: What a masked patch shows: ``mean`` (the image's mean colour), ``blur``
            (a Gaussian blur of the image, σ = half a patch) or ``black``.
        text_baseline: ``mask`` (word pieces become ``[MASK]``) or ``remove`` (attention mask 0).
        max_evals: Model evaluations per patient and modality for the sampling estimators. The
            permutation estimator needs at least ``2M + 1`` (one antithetic pair of permutations
            over ``M`` players) and uses whole pairs, so it spends ``max(max_evals, 2M + 1)`` at most.
        method: ``exact`` (all ``2^M`` coalitions, Eq. 21), ``permutation`` or ``kernel`` (``shap``),
            or ``auto``: exact when ``M ≤ 12`` and ``2^M ≤ max_evals``, else permutation.
        batch_size: Rows per forward pass.
        seed: Seeds the sampling estimators (the global NumPy RNG is restored afterwards).
        image_grid: ``(rows, cols)`` of the image players; None takes the ViT's patch grid.
    """

    image_baseline: str = "mean"
    text_baseline: str = "mask"
    max_evals: int = 1000
    method: str = "auto"
    batch_size: int = 256
    seed: int = 0
    image_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        choices = {"image_baseline": IMAGE_BASELINES, "text_baseline": TEXT_BASELINES, "method": METHODS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"explain {name}={getattr(self, name)!r} is not one of: {', '.join(valid)}")
        if self.max_evals < 1:
            raise ConfigError(f"explain max_evals must be >= 1, got {self.max_evals}")
        if self.batch_size < 1:
            raise ConfigError(f"explain batch_size must be >= 1, got {self.batch_size}")
        if self.image_grid is not None and min(self.image_grid) < 1:
            raise ConfigError(f"explain image_grid must be two positive numbers, got {self.image_grid}")


@dataclass(frozen=True)
class TokenVocabulary:
    """What the text explainer needs from a tokenizer.

    Attributes:
        tokens: Token string of every id (``tokens[id]``).
        mask_token_id: Id of ``[MASK]`` (None: only the ``remove`` baseline is possible).
        special_ids: Ids that are never players (``[CLS]``, ``[SEP]``, ``[PAD]`` ...).
    """

    tokens: Sequence[str]
    mask_token_id: int | None
    special_ids: frozenset[int] = frozenset()

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> TokenVocabulary:
        """Read the vocabulary, ``[MASK]`` and the special tokens of a ``transformers`` tokenizer."""
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        mask_id = tokenizer.mask_token_id
        special = frozenset(int(i) for i in tokenizer.all_special_ids if i != mask_id)
        return cls(tokens=list(tokens), mask_token_id=None if mask_id is None else int(mask_id), special_ids=special)


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values of one game.

    Attributes:
        values: ``φ`` ``[M, K]`` (one column per explained output).
        model_evals: Coalitions the estimator evaluated.
    """

    values: np.ndarray
    model_evals: int


# ---------------------------------------------------------------------------------------------
# Estimators: a game in, Shapley values out.


def exact_shapley(game: CoalitionGame, num_features: int) -> ShapleyResult:
    """Exact Shapley values by enumerating all ``2^M`` coalitions (one batched game call).

    Eq. 21 of Fed-MMX: ``φ_i = Σ_{S ⊆ N∖{i}} |S|! (M − |S| − 1)! / M! · [f(S ∪ {i}) − f(S)]``.

    Args:
        game: The value function.
        num_features: ``M`` (at most :data:`EXACT_MAX_FEATURES`).

    Returns:
        ``φ`` ``[M, outputs]`` and ``2^M`` evaluations.

    Raises:
        ConfigError: If ``M`` exceeds :data:`EXACT_MAX_FEATURES`.

    Example:
        >>> weights = np.array([1.0, 2.0, 3.0])
        >>> def game(coalitions):  # additive part plus an interaction of players 0 and 1
        ...     return (coalitions @ weights + 4.0 * coalitions[:, 0] * coalitions[:, 1])[:, None]
        >>> [round(float(phi), 9) for phi in exact_shapley(game, 3).values[:, 0]]  # last bits follow the BLAS kernel
        [3.0, 4.0, 3.0]
    """
    if num_features > EXACT_MAX_FEATURES:
        raise ConfigError(
            f"exact Shapley values over {num_features} players need 2^{num_features} model evaluations; "
            f"use method=permutation or kernel beyond {EXACT_MAX_FEATURES} players"
        )
    codes = np.arange(2**num_features)
    coalitions = ((codes[:, None] >> np.arange(num_features)) & 1).astype(bool)
    values = np.asarray(game(coalitions), dtype=np.float64)
    sizes = coalitions.sum(axis=1)
    size_weight = np.array(
        [
            math.factorial(s) * math.factorial(num_features - s - 1) / math.factorial(num_features)
            for s in range(num_features)
        ]
    )
    phi = np.zeros((num_features, values.shape[1]))
    for player in range(num_features):
        without = codes[((codes >> player) & 1) == 0]
        marginal = values[without | (1 << player)] - values[without]
        phi[player] = size_weight[sizes[without]] @ marginal
    return ShapleyResult(phi, len(codes))


def permutation_shapley(game: CoalitionGame, num_features: int, max_evals: int, seed: int) -> ShapleyResult:
    """Shapley values estimated by ``shap.explainers.Permutation`` over a binary coalition vector.

    The explained input is all-ones and the masker's single background row all-zeros, so a
    masked row *is* a coalition. Each antithetic pair of permutations (``2M + 1`` coalitions,
    one game call) telescopes to ``f(x) − f(baseline)``: efficiency is exact at any budget.

    Args:
        game: The value function.
        num_features: ``M``.
        max_evals: Budget; rounded down to whole pairs, and at least one pair.
        seed: Permutation seed.
    """
    import shap  # deferred: importing shap costs seconds and is only needed when explaining

    pair_cost = 2 * num_features + 1
    pairs = max(1, max_evals // pair_cost)
    masker = shap.maskers.Independent(np.zeros((1, num_features)), max_samples=1)
    with _seeded_numpy(seed):
        explainer = shap.explainers.Permutation(lambda z: game(np.asarray(z) > 0.5), masker, seed=seed)
        explanation = explainer(
            np.ones((1, num_features)), max_evals=pairs * pair_cost, batch_size=pair_cost, silent=True
        )
    return ShapleyResult(np.asarray(explanation.values[0], dtype=np.float64), pairs * pair_cost)


def kernel_shapley(game: CoalitionGame, num_features: int, max_evals: int, seed: int) -> ShapleyResult:
    """Shapley values estimated by ``shap.KernelExplainer`` (weighted linear regression over
    sampled coalitions, constrained to efficiency). With ``max_evals ≥ 2^M − 2`` every coalition
    is enumerated and the result is exact.

    Args:
        game: The value function.
        num_features: ``M``.
        max_evals: Sampled coalitions (``nsamples``).
        seed: Sampling seed.
    """
    import shap

    counted = _CountingGame(game)
    with _seeded_numpy(seed):
        explainer = shap.KernelExplainer(lambda z: counted(np.asarray(z) > 0.5), np.zeros((1, num_features)))
        values = explainer.shap_values(np.ones((1, num_features)), nsamples=max_evals, l1_reg=False, silent=True)
    return ShapleyResult(np.asarray(values, dtype=np.float64).reshape(num_features, -1), counted.evals)


def shapley_values(game: CoalitionGame, num_features: int, settings: ExplainSettings) -> tuple[ShapleyResult, str]:
    """Dispatch to the estimator ``settings.method`` names (resolving ``auto``).

    Returns:
        The result and the method actually used.
    """
    method = settings.method
    if method == "auto":
        exact_fits = num_features <= EXACT_MAX_FEATURES and 2**num_features <= settings.max_evals
        method = "exact" if exact_fits else "permutation"
    if method == "exact":
        return exact_shapley(game, num_features), method
    if method == "kernel":
        return kernel_shapley(game, num_features, settings.max_evals, settings.seed), method
    return permutation_shapley(game, num_features, settings.max_evals, settings.seed), method


def fused_profile(image_attributions: np.ndarray, text_attributions: np.ndarray, image_weight: float) -> np.ndarray:
    """The fused attribution profile of Eq. 23 of Fed-MMX: ``[λ · φ_I / ‖φ_I‖₂ ; (1 − λ) · φ_T / ‖φ_T‖₂]``.

    A display device only: each modality is normalised by its own norm and the two games have
    different players and baselines, so a patch and a word cannot be ranked against each other
    by these numbers.

    Args:
        image_attributions: ``φ_I`` ``[M_I]``.
        text_attributions: ``φ_T`` ``[M_T]``.
        image_weight: ``λ`` in ``[0, 1]``.

    Raises:
        ConfigError: If ``λ`` is outside ``[0, 1]``.

    Example:
        >>> [round(float(value), 9) for value in fused_profile(np.array([3.0, 4.0]), np.array([0.0, -2.0]), 0.5)]
        [0.3, 0.4, 0.0, -0.5]
    """
    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"fused profile weight λ must be in [0, 1], got {image_weight}")

    def unit(phi: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(phi))
        return phi / norm if norm > 0 else np.zeros_like(phi, dtype=np.float64)

    return np.concatenate([image_weight * unit(image_attributions), (1.0 - image_weight) * unit(text_attributions)])


# ---------------------------------------------------------------------------------------------
# Games: a module and one patient in, a value function over coalitions out.


class _CountingGame:
    """Counts the coalitions a game evaluates."""

    def __init__(self, game: CoalitionGame) -> None:
        self.game = game
        self.evals = 0

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        self.evals += len(coalitions)
        return self.game(coalitions)


def image_baseline(image: torch.Tensor, grid: tuple[int, int], baseline: str) -> torch.Tensor:
    """The all-masked image ``[3, H, W]`` (in the model's normalised space).

    ``mean`` is the image's own mean colour, ``black`` is pixel value 0, ``blur`` a Gaussian
    blur with σ of half a patch (so a blurred patch keeps colour, loses cell detail).
    """
    if baseline == "mean":
        return image.mean(dim=(-2, -1), keepdim=True).expand_as(image).clone()
    if baseline == "black":
        mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
        return ((0.0 - mean) / std).expand_as(image).clone()
    if baseline == "blur":
        sigma = max(1.0, image.shape[-1] / grid[1] / 2)
        kernel = 2 * math.ceil(2 * sigma) + 1
        padded = F.pad(image.unsqueeze(0), [kernel // 2] * 4, mode="reflect")
        return _gaussian_blur(padded, kernel, sigma)[0]
    raise ConfigError(f"image_baseline={baseline!r} is not one of: {', '.join(IMAGE_BASELINES)}")


def _gaussian_blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(kernel, dtype=images.dtype, device=images.device) - kernel // 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    channels = images.shape[1]
    horizontal = weights.view(1, 1, 1, kernel).repeat(channels, 1, 1, 1)
    vertical = weights.view(1, 1, kernel, 1).repeat(channels, 1, 1, 1)
    return F.conv2d(F.conv2d(images, horizontal, groups=channels), vertical, groups=channels)


def patch_grid(module: nn.Module) -> tuple[int, int]:
    """The ViT patch grid ``(rows, cols)`` of ``module.image_encoder``.

    Read from fedvlm's ``ImageEncoder.patch_grid``, else from a timm ``patch_embed.grid_size``.

    Raises:
        ConfigError: If the encoder has no patch grid (e.g. a CNN): set ``image_grid``.
    """
    encoder = getattr(module, "image_encoder", None)
    grid = getattr(encoder, "patch_grid", None)
    if grid is None:
        patch_embed = getattr(getattr(encoder, "backbone", encoder), "patch_embed", None)
        grid = getattr(patch_embed, "grid_size", None)
    if grid is None:
        raise ConfigError(
            f"the image encoder {type(encoder).__name__} has no ViT patch grid; "
            "give the explainer image_grid=(rows, cols)"
        )
    return int(grid[0]), int(grid[1])


def word_players(
    input_ids: Sequence[int], attention_mask: Sequence[int], vocabulary: TokenVocabulary
) -> tuple[list[str], list[list[int]]]:
    """Group a report's tokens into words, the players of the text game.

    Special tokens and padding are not players; a word piece ``##x`` joins the word before it
    (our word-level tokenizer has one token per word, punctuation included).

    Returns:
        The words and, for each, its token positions.

    Example:
        >>> vocab = TokenVocabulary(["[CLS]", "[SEP]", "[PAD]", "blast", "##s", "45", "%"], None, frozenset({0, 1, 2}))
        >>> word_players([0, 3, 4, 5, 6, 1, 2], [1, 1, 1, 1, 1, 1, 0], vocab)
        (['blasts', '45', '%'], [[1, 2], [3], [4]])
    """
    words: list[str] = []
    positions: list[list[int]] = []
    for position, (token_id, attended) in enumerate(zip(input_ids, attention_mask, strict=True)):
        if not attended or int(token_id) in vocabulary.special_ids:
            continue
        if not 0 <= int(token_id) < len(vocabulary.tokens):
            raise DataError(f"token id {int(token_id)} at position {position} is outside the vocabulary")
        token = vocabulary.tokens[int(token_id)]
        if token.startswith(WORD_PIECE_PREFIX) and words and positions[-1][-1] == position - 1:
            words[-1] += token[len(WORD_PIECE_PREFIX) :]
            positions[-1].append(position)
        else:
            words.append(token)
            positions.append([position])
    return words, positions


# ---------------------------------------------------------------------------------------------
# The one code path the callback and ``fedvlm explain`` share.


@contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seed the global NumPy RNG (``shap`` samples from it) and restore it afterwards, so that
    explaining leaves the training's random streams untouched."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
