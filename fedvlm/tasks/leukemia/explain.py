"""Per-patient Shapley values of both leukemia heads, on image patches and on report words, separately.

Each modality is a cooperative game of its own (Fed-MMX §3.5): the players are the ViT patches
of the image, or the words of the report, and the value of a coalition ``S`` is the model's
output when the players in ``S`` keep their actual value and the others are replaced by a
baseline, **the other modality held at the actual input** (the baselines and estimators are
:mod:`fedvlm.explain.shapley`'s).

Two outputs are explained with the same model evaluations (one forward gives both heads):

* ``detection``: ``P(leukemia)`` (the sigmoid of the detection logit). Probabilities, not
  logits, so that attributions of both heads share one scale (a change of probability) and
  efficiency reads "the image raised P(leukemia) from 0.41 with every patch masked to 0.93".
* ``stage``: the probability of the stage predicted at the actual input (fixed per patient).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedvlm.data.prepared import BundleDataset, bundle_size
from fedvlm.errors import ConfigError, DataError
from fedvlm.explain.shapley import (
    CoalitionGame,
    ExplainSettings,
    ShapleyResult,
    TokenVocabulary,
    image_baseline,
    patch_grid,
    shapley_values,
    word_players,
)

HEADS = ("detection", "stage")
"""The explained outputs, in the column order of every game: ``P(leukemia)``, ``P(predicted stage)``."""

logger = logging.getLogger(__name__)


EFFICIENCY_WARN = 1e-3
"""An efficiency error above this (in probability) is logged as a warning."""


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
