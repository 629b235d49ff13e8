"""Per-patient Shapley values of both heads, on image patches and on report words, separately.

Each modality is a cooperative game of its own (Fed-MMX §3.5): the players are the ViT patches
of the image, or the words of the report, and the value of a coalition ``S`` is the model's
output when the players in ``S`` keep their actual value and the others are replaced by a
baseline, **the other modality held at the actual input**:

* **Image.** A patch outside ``S`` is painted with the image's mean colour (``mean``), a
  Gaussian-blurred copy of itself (``blur``) or black (``black``).
* **Text.** A word outside ``S`` has all its word pieces replaced by ``[MASK]`` (``mask``) or
  is dropped from attention and pooling (``remove``; the remaining words keep their positions).

Two outputs are explained with the same model evaluations (one forward gives both heads):

* ``detection``: ``P(leukemia)`` (the sigmoid of the detection logit). Probabilities, not
  logits, so that attributions of both heads share one scale (a change of probability) and
  efficiency reads "the image raised P(leukemia) from 0.41 with every patch masked to 0.93".
* ``stage``: the probability of the stage predicted at the actual input (fixed per patient).

Shapley values are computed exactly for small games (every coalition, Eq. 21 of Fed-MMX) and
otherwise estimated by ``shap``'s permutation explainer (antithetic permutations, so that
efficiency ``Σ φ_i = f(x) − f(baseline)`` holds exactly whatever the budget) or its kernel
explainer. Every coalition batch is one forward pass (chunked to ``batch_size`` rows).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import IMAGENET_MEAN, IMAGENET_STD, BundleDataset, bundle_size
from fedvlm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

HEADS = ("detection", "stage")
"""The explained outputs, in the column order of every game: ``P(leukemia)``, ``P(predicted stage)``."""
IMAGE_BASELINES = ("mean", "blur", "black")
TEXT_BASELINES = ("mask", "remove")
METHODS = ("auto", "exact", "permutation", "kernel")
EXACT_MAX_FEATURES = 12
"""The exact path enumerates ``2^M`` coalitions; beyond this it is refused."""
WORD_PIECE_PREFIX = "##"
EFFICIENCY_WARN = 1e-3
"""An efficiency error above this (in probability) is logged as a warning."""

CoalitionGame = Callable[[np.ndarray], np.ndarray]
"""Boolean coalitions ``[N, M]`` (True: the player keeps its actual value) → values ``[N, len(HEADS)]``."""


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
        values: ``φ`` ``[M, len(HEADS)]``.
        model_evals: Coalitions the estimator evaluated.
    """

    values: np.ndarray
    model_evals: int


@dataclass
class ModalityExplanation:
    """One modality of one patient, both heads.

    Attributes:
        modality: ``image`` or ``text``.
        features: Player names: ``r{row}c{col}`` patches, or the report's words.
        attributions: Head name → ``φ`` ``[M]``.
        full_value: Head name → ``f(x)``, the output at the actual input.
        baseline_value: Head name → ``f(baseline)``, every player masked.
        efficiency_error: Head name → ``|Σ φ − (f(x) − f(baseline))|``.
        baseline: The baseline used (``mean``, ``mask`` ...).
        method: The estimator used (``exact``, ``permutation`` or ``kernel``).
        model_evals: Model evaluations spent (the estimator's and the two of the efficiency check).
        seconds: Wall time.
        grid: ``(rows, cols)`` of image patches (None for text).
    """

    modality: str
    features: list[str]
    attributions: dict[str, np.ndarray]
    full_value: dict[str, float]
    baseline_value: dict[str, float]
    efficiency_error: dict[str, float]
    baseline: str
    method: str
    model_evals: int
    seconds: float
    grid: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_json`)."""
        return {
            "modality": self.modality,
            "features": self.features,
            "attributions": {head: [float(v) for v in phi] for head, phi in self.attributions.items()},
            "full_value": self.full_value,
            "baseline_value": self.baseline_value,
            "efficiency_error": self.efficiency_error,
            "baseline": self.baseline,
            "method": self.method,
            "model_evals": self.model_evals,
            "seconds": self.seconds,
            "grid": list(self.grid) if self.grid is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModalityExplanation:
        grid = data.get("grid")
        return cls(
            modality=data["modality"],
            features=list(data["features"]),
            attributions={head: np.asarray(phi, dtype=np.float64) for head, phi in data["attributions"].items()},
            full_value=dict(data["full_value"]),
            baseline_value=dict(data["baseline_value"]),
            efficiency_error=dict(data["efficiency_error"]),
            baseline=data["baseline"],
            method=data["method"],
            model_evals=int(data["model_evals"]),
            seconds=float(data["seconds"]),
            grid=(int(grid[0]), int(grid[1])) if grid is not None else None,
        )


@dataclass
class PatientExplanation:
    """Both modalities of one patient, with the prediction they explain.

    Attributes:
        patient: Patient (or sample) id.
        leukemia_probability: ``P(leukemia)`` at the actual input.
        stage_probabilities: Stage probabilities at the actual input.
        predicted_stage: 0-based argmax of ``stage_probabilities`` (the stage head's explained output).
        image: The image explanation (None for a text-only model).
        text: The text explanation (None for an image-only model).
        leukemia: The label, when the bundle has one.
        stage: The 0-based stage label (``-1`` negative or unknown), when the bundle has one.
        pixels: The ``H×W×3`` ``uint8`` image, for rendering (not serialised).
    """

    patient: str
    leukemia_probability: float
    stage_probabilities: list[float]
    predicted_stage: int
    image: ModalityExplanation | None
    text: ModalityExplanation | None
    leukemia: int | None = None
    stage: int | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)

    def modalities(self) -> list[ModalityExplanation]:
        """The explained modalities (image first)."""
        return [m for m in (self.image, self.text) if m is not None]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_json`; ``pixels`` are not kept)."""
        return {
            "patient": self.patient,
            "leukemia_probability": self.leukemia_probability,
            "stage_probabilities": self.stage_probabilities,
            "predicted_stage": self.predicted_stage,
            "leukemia": self.leukemia,
            "stage": self.stage,
            "image": self.image.to_json() if self.image else None,
            "text": self.text.to_json() if self.text else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PatientExplanation:
        return cls(
            patient=str(data["patient"]),
            leukemia_probability=float(data["leukemia_probability"]),
            stage_probabilities=[float(p) for p in data["stage_probabilities"]],
            predicted_stage=int(data["predicted_stage"]),
            image=ModalityExplanation.from_json(data["image"]) if data.get("image") else None,
            text=ModalityExplanation.from_json(data["text"]) if data.get("text") else None,
            leukemia=data.get("leukemia"),
            stage=data.get("stage"),
        )


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


class _HeadOutputs:
    """Runs the module on batches of masked inputs and returns the explained outputs ``[N, 2]``."""

    def __init__(self, module: nn.Module, predicted_stage: int, batch_size: int) -> None:
        self.module = module
        self.predicted_stage = predicted_stage
        self.batch_size = batch_size

    def __call__(self, build: Callable[[slice], dict[str, torch.Tensor]], rows: int) -> np.ndarray:
        outputs = []
        for start in range(0, rows, self.batch_size):
            binary_logit, stage_logits = self.module(build(slice(start, min(rows, start + self.batch_size))))
            stage_prob = torch.softmax(stage_logits.float(), dim=-1)[:, self.predicted_stage]
            outputs.append(torch.stack([torch.sigmoid(binary_logit.float()), stage_prob], dim=1).cpu())
        return torch.cat(outputs).double().numpy()


def image_game(
    forward: _HeadOutputs, sample: Mapping[str, torch.Tensor], grid: tuple[int, int], baseline: str
) -> CoalitionGame:
    """The image game: patch ``(r, c)`` shows the image or the baseline; the report stays as is.

    Args:
        forward: Runs the module.
        sample: One patient's model inputs (``image`` ``[3, H, W]`` normalised, ``input_ids`` ...).
        grid: ``(rows, cols)`` of players; ``H`` and ``W`` must be multiples.
        baseline: One of :data:`IMAGE_BASELINES`.
    """
    image = sample["image"]
    background = image_baseline(image, grid, baseline)
    rows, cols = grid
    patch_h, patch_w = image.shape[-2] // rows, image.shape[-1] // cols

    def game(coalitions: np.ndarray) -> np.ndarray:
        keep = torch.as_tensor(coalitions, dtype=image.dtype, device=image.device).view(-1, 1, rows, cols)

        def build(part: slice) -> dict[str, torch.Tensor]:
            pixel_keep = keep[part].repeat_interleave(patch_h, dim=2).repeat_interleave(patch_w, dim=3)
            batch = {k: v.unsqueeze(0).expand(pixel_keep.shape[0], *v.shape) for k, v in sample.items()}
            batch["image"] = background + pixel_keep * (image - background)
            return batch

        return forward(build, len(coalitions))

    return game


def text_game(
    forward: _HeadOutputs,
    sample: Mapping[str, torch.Tensor],
    word_positions: Sequence[Sequence[int]],
    baseline: str,
    mask_token_id: int | None,
) -> CoalitionGame:
    """The text game: word ``j`` (all its token positions) is present or masked/removed; the
    image stays as is.

    Raises:
        ConfigError: For the ``mask`` baseline without a ``[MASK]`` token.
    """
    if baseline == "mask" and mask_token_id is None:
        raise ConfigError("text_baseline=mask needs a tokenizer with a [MASK] token; use text_baseline=remove")
    input_ids, attention_mask = sample["input_ids"], sample["attention_mask"]
    # player_tokens[j, t] is True where token t belongs to word j.
    player_tokens = torch.zeros(len(word_positions), input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for word, positions in enumerate(word_positions):
        player_tokens[word, list(positions)] = True

    def game(coalitions: np.ndarray) -> np.ndarray:
        dropped = torch.as_tensor(~coalitions, dtype=torch.float32, device=input_ids.device)
        token_dropped = (dropped @ player_tokens.float()) > 0  # [N, L]

        def build(part: slice) -> dict[str, torch.Tensor]:
            drop = token_dropped[part]
            batch = {k: v.unsqueeze(0).expand(drop.shape[0], *v.shape) for k, v in sample.items()}
            if baseline == "mask":
                batch["input_ids"] = torch.where(
                    drop, torch.full_like(drop, int(mask_token_id or 0), dtype=input_ids.dtype), input_ids
                )
            else:
                batch["attention_mask"] = torch.where(drop, torch.zeros_like(attention_mask), attention_mask)
            return batch

        return forward(build, len(coalitions))

    return game


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


def explain_patients(
    module: nn.Module,
    bundle: Mapping[str, torch.Tensor],
    settings: ExplainSettings | None = None,
    vocabulary: TokenVocabulary | None = None,
    patient_ids: Sequence[str] | None = None,
) -> list[PatientExplanation]:
    """Explain every patient of ``bundle``: both heads, image patches and report words separately.

    The module is run in eval mode without gradients and left in the train/eval and grad mode it
    was found in.

    Args:
        module: Any module with the ``LeukemiaModule`` interface: ``forward(batch)`` →
            ``(binary_logit [B], stage_logits [B, K])``, and ``image_encoder`` / ``text_encoder``
            attributes (None or absent for a missing modality).
        bundle: The patients (``image`` ``uint8`` ``[N, 3, H, W]``, ``input_ids``, ``attention_mask``,
            optionally ``leukemia``, ``stage``, ``index``).
        settings: Baselines, budget and estimator.
        vocabulary: Needed to explain the text.
        patient_ids: One id per row; defaults to the bundle's ``index`` (else the row number).

    Returns:
        One :class:`PatientExplanation` per row.

    Raises:
        ConfigError: If the text is to be explained without a vocabulary, or the image size is
            not a multiple of the patch grid.
    """
    settings = settings or ExplainSettings()
    size = bundle_size(bundle)
    ids = list(patient_ids) if patient_ids is not None else _default_ids(bundle)
    if len(ids) != size:
        raise DataError(f"{len(ids)} patient ids for {size} patients")
    explain_image = getattr(module, "image_encoder", None) is not None and "image" in bundle
    explain_text = getattr(module, "text_encoder", None) is not None and "input_ids" in bundle
    if explain_text and vocabulary is None:
        raise ConfigError("explaining the report needs the tokenizer (or a TokenVocabulary)")
    grid = (settings.image_grid or patch_grid(module)) if explain_image else None
    device = next(module.parameters()).device
    dataset = BundleDataset({k: v for k, v in bundle.items() if k in ("image", "input_ids", "attention_mask")})
    was_training = module.training
    module.eval()
    explanations = []
    try:
        with torch.no_grad():
            for row in range(size):
                sample = {k: v.to(device) for k, v in dataset[row].items()}
                explanations.append(
                    _explain_one(
                        module, sample, bundle, row, ids[row], settings, grid, vocabulary, explain_image, explain_text
                    )
                )
    finally:
        module.train(was_training)
    return explanations


def _explain_one(
    module: nn.Module,
    sample: dict[str, torch.Tensor],
    bundle: Mapping[str, torch.Tensor],
    row: int,
    patient: str,
    settings: ExplainSettings,
    grid: tuple[int, int] | None,
    vocabulary: TokenVocabulary | None,
    explain_image: bool,
    explain_text: bool,
) -> PatientExplanation:
    binary_logit, stage_logits = module({k: v.unsqueeze(0) for k, v in sample.items()})
    stage_probabilities = torch.softmax(stage_logits[0].float(), dim=-1)
    predicted_stage = int(stage_probabilities.argmax())
    forward = _HeadOutputs(module, predicted_stage, settings.batch_size)
    image = text = None
    if explain_image and grid is not None:
        height, width = sample["image"].shape[-2:]
        if height % grid[0] or width % grid[1]:
            raise ConfigError(f"image size {height}x{width} is not a multiple of the patch grid {grid[0]}x{grid[1]}")
        game = image_game(forward, sample, grid, settings.image_baseline)
        features = [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]
        with _held_fixed(module, "text_encoder", sample, ("input_ids", "attention_mask"), binary_logit):
            image = _explain_modality("image", game, features, settings, settings.image_baseline, patient, grid)
    if explain_text and vocabulary is not None:
        words, positions = word_players(sample["input_ids"].tolist(), sample["attention_mask"].tolist(), vocabulary)
        game = text_game(forward, sample, positions, settings.text_baseline, vocabulary.mask_token_id)
        with _held_fixed(module, "image_encoder", sample, ("image",), binary_logit):
            text = _explain_modality("text", game, words, settings, settings.text_baseline, patient, None)
    pixels = bundle["image"][row].permute(1, 2, 0).cpu().numpy() if "image" in bundle else None
    return PatientExplanation(
        patient=patient,
        leukemia_probability=float(torch.sigmoid(binary_logit[0].float())),
        stage_probabilities=[float(p) for p in stage_probabilities],
        predicted_stage=predicted_stage,
        image=image,
        text=text,
        leukemia=int(bundle["leukemia"][row]) if "leukemia" in bundle else None,
        stage=int(bundle["stage"][row]) if "stage" in bundle else None,
        pixels=pixels,
    )


def _explain_modality(
    modality: str,
    game: CoalitionGame,
    features: list[str],
    settings: ExplainSettings,
    baseline: str,
    patient: str,
    grid: tuple[int, int] | None,
) -> ModalityExplanation:
    started = time.perf_counter()
    num_features = len(features)
    ends = game(np.array([[True] * num_features, [False] * num_features]))  # f(x), f(baseline)
    if num_features == 0:
        result, method = ShapleyResult(np.zeros((0, len(HEADS))), 0), "none"
    else:
        result, method = shapley_values(game, num_features, settings)
    efficiency_error = {
        head: float(abs(result.values[:, k].sum() - (ends[0, k] - ends[1, k]))) for k, head in enumerate(HEADS)
    }
    worst = max(efficiency_error.values())
    log = logger.warning if worst > EFFICIENCY_WARN else logger.debug
    log(
        "patient %s %s: efficiency error %.2e (%s, %d evaluations)",
        patient,
        modality,
        worst,
        method,
        result.model_evals,
    )
    return ModalityExplanation(
        modality=modality,
        features=features,
        attributions={head: result.values[:, k].copy() for k, head in enumerate(HEADS)},
        full_value={head: float(ends[0, k]) for k, head in enumerate(HEADS)},
        baseline_value={head: float(ends[1, k]) for k, head in enumerate(HEADS)},
        efficiency_error=efficiency_error,
        baseline=baseline,
        method=method,
        model_evals=result.model_evals + 2,
        seconds=time.perf_counter() - started,
        grid=grid,
    )


class _ConstantEncoder(nn.Module):
    """Stands in for the encoder of the modality held fixed: its embedding of the actual input,
    repeated for every row."""

    def __init__(self, embedding: torch.Tensor, out_dim: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.out_dim = out_dim

    def forward(self, first: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.embedding.expand(first.shape[0], *self.embedding.shape[1:])


@contextmanager
def _held_fixed(
    module: nn.Module, name: str, sample: Mapping[str, torch.Tensor], keys: Sequence[str], binary_logit: torch.Tensor
) -> Iterator[None]:
    """Encode the held-fixed modality once instead of once per coalition (about half the cost of
    a game), by swapping ``module.<name>`` for its cached output. The swap is kept only if the
    module still predicts the same logit with it (a module whose forward does not call the
    encoder this way is run as is); the encoder is always put back."""
    encoder = getattr(module, name, None)
    if not isinstance(encoder, nn.Module):
        yield
        return
    try:
        embedding = encoder(*(sample[key].unsqueeze(0) for key in keys))
    except (TypeError, RuntimeError):  # not an encoder of the LeukemiaModule kind: nothing to cache
        embedding = None
    if not isinstance(embedding, torch.Tensor):
        yield
        return
    try:
        setattr(module, name, _ConstantEncoder(embedding, int(getattr(encoder, "out_dim", embedding.shape[-1]))))
        check_logit, _ = module({k: v.unsqueeze(0) for k, v in sample.items()})
        if not torch.allclose(check_logit.float(), binary_logit.float(), atol=1e-5, rtol=1e-4):
            setattr(module, name, encoder)
        yield
    finally:
        setattr(module, name, encoder)


def _default_ids(bundle: Mapping[str, Any]) -> list[str]:
    if "patient" in bundle:
        patients = bundle["patient"]
        return [str(p) for p in (patients.tolist() if isinstance(patients, torch.Tensor) else patients)]
    if "index" in bundle:
        return [f"{int(i):05d}" for i in bundle["index"]]
    return [f"{row:05d}" for row in range(bundle_size(bundle))]


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
