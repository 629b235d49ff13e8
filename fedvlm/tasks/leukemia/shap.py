"""``ShapCallback``: explain a fixed set of patients after every local round, on the site.

At the end of local training the callback explains its patients with the module's current
weights (:func:`~fedvlm.tasks.leukemia.explain.explain_patients`), writes ``output_dir/round_NNN/``
(per-patient JSON, heatmap PNGs and HTML pages, ``index.html``, ``summary.json``) and keeps a
dict of aggregate quality metrics. Only aggregates may leave the site: per-patient
attributions describe one patient's image and report, so they stay in ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from fedvlm.data.prepared import Bundle, bundle_size
from fedvlm.errors import ConfigError, DataError
from fedvlm.explain import quality
from fedvlm.explain.render import save_heatmap_png
from fedvlm.explain.shapley import ExplainSettings, TokenVocabulary
from fedvlm.tasks.leukemia.explain import HEADS, PatientExplanation, explain_patients
from fedvlm.tasks.leukemia.pages import index_html, patient_html

logger = logging.getLogger(__name__)

GROUND_TRUTH_HEAD = "detection"
"""Blast centres and signal words are checked against the detection head's attributions."""

SHARED_PATIENTS = "explain/patients"
"""The shared aggregate counting the patients explained (summed over clients, not averaged)."""


def round_dir(output_dir: Path, round_number: int) -> Path:
    """``output_dir/round_NNN``."""
    return output_dir / f"round_{round_number:03d}"


def file_stem(patient: str) -> str:
    """A file-name-safe form of a patient id.

    Example:
        >>> file_stem("site 3/patient#7")
        'site_3_patient_7'
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "_", patient)


def summarize(
    explanations: Sequence[PatientExplanation],
    top_k: int,
    previous: Mapping[str, PatientExplanation] | None = None,
    blast_points: Sequence[Sequence[tuple[float, float]]] | None = None,
    signal_words: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Aggregate quality metrics of one round (means over patients, modalities and heads).

    Args:
        explanations: This round's patients.
        top_k: Top-k size for sparsity, consistency and ground truth.
        previous: Patient id → the previous round's explanation, for ``explain/consistency``.
        blast_points: Blast centres ``(x, y)`` per patient, in pixels of the explained images.
        signal_words: Signal words per patient.

    Returns:
        ``explain/patients``, ``explain/efficiency_error_max``, ``explain/sparsity`` (mean share of
        ``Σ|φ|`` in the top k), ``explain/active_features`` (mean count of non-negligible
        attributions), ``explain/model_evals``; ``explain/consistency`` (mean top-k Jaccard with the
        previous round) when there is one; ``explain/image_blast_hit_rate`` / ``_chance`` and
        ``explain/text_signal_hit_rate`` / ``_chance`` when the ground truth is given.
    """
    games = [(e, m) for e in explanations for m in e.modalities()]
    summary: dict[str, float] = {
        SHARED_PATIENTS: float(len(explanations)),
        "explain/efficiency_error_max": max((max(m.efficiency_error.values()) for _, m in games), default=0.0),
        "explain/sparsity": _mean(quality.top_k_mass(m.attributions[h], top_k) for _, m in games for h in HEADS),
        "explain/active_features": _mean(quality.active_features(m.attributions[h]) for _, m in games for h in HEADS),
        "explain/model_evals": float(sum(m.model_evals for _, m in games)),
    }
    if previous:
        overlaps: list[float] = []
        for e, m in games:
            before = previous.get(e.patient)
            old = getattr(before, m.modality, None) if before is not None else None
            if old is not None and len(old.features) == len(m.features):
                overlaps.extend(quality.top_k_jaccard(m.attributions[h], old.attributions[h], top_k) for h in HEADS)
        if overlaps:
            summary["explain/consistency"] = float(np.mean(overlaps))
    if blast_points is not None:
        patch_masks, patch_attributions = [], []
        for e, points in zip(explanations, blast_points, strict=True):
            if e.image is not None and e.image.grid is not None and e.pixels is not None:
                patch_masks.append(quality.patches_containing(points, e.pixels.shape[:2], e.image.grid))
                patch_attributions.append(e.image.attributions[GROUND_TRUTH_HEAD])
        agreement = quality.ground_truth_agreement(patch_attributions, patch_masks, top_k)
        summary["explain/image_blast_hit_rate"] = agreement.hit_rate
        summary["explain/image_blast_chance"] = agreement.chance_rate
    if signal_words is not None:
        texts = [(e.text, words) for e, words in zip(explanations, signal_words, strict=True) if e.text is not None]
        agreement = quality.ground_truth_agreement(
            [t.attributions[GROUND_TRUTH_HEAD] for t, _ in texts],
            [quality.words_matching(t.features, words) for t, words in texts],
            top_k,
        )
        summary["explain/text_signal_hit_rate"] = agreement.hit_rate
        summary["explain/text_signal_chance"] = agreement.chance_rate
    return summary


def write_round(
    output_dir: Path, round_number: int, explanations: Sequence[PatientExplanation], summary: Mapping[str, float]
) -> Path:
    """Write ``output_dir/round_NNN/``: per patient ``<id>.json``, ``<id>.html``, ``<id>_image.png``
    and one heatmap PNG per head; ``index.html`` and ``summary.json``.

    Returns:
        The round directory.
    """
    directory = round_dir(output_dir, round_number)
    directory.mkdir(parents=True, exist_ok=True)
    pages = {}
    for explanation in explanations:
        stem = file_stem(explanation.patient)
        (directory / f"{stem}.json").write_text(json.dumps({"round": round_number, **explanation.to_json()}, indent=1))
        heatmaps: dict[str, str] = {}
        original = None
        if explanation.image is not None and explanation.pixels is not None and explanation.image.grid is not None:
            original = f"{stem}_image.png"
            from PIL import Image

            Image.fromarray(explanation.pixels).save(directory / original, format="PNG")
            for head in HEADS:
                heatmaps[head] = f"{stem}_{head}.png"
                save_heatmap_png(
                    explanation.pixels,
                    explanation.image.attributions[head],
                    explanation.image.grid,
                    directory / heatmaps[head],
                )
        pages[explanation.patient] = f"{stem}.html"
        (directory / pages[explanation.patient]).write_text(
            patient_html(explanation, heatmaps, round_number, original), encoding="utf-8"
        )
    (directory / "index.html").write_text(index_html(round_number, explanations, pages, summary), encoding="utf-8")
    (directory / "summary.json").write_text(json.dumps(dict(summary), indent=1))
    return directory


def load_round(output_dir: Path, round_number: int, patients: Sequence[str]) -> dict[str, PatientExplanation]:
    """The explanations of ``patients`` written for round ``round_number`` (those found)."""
    directory = round_dir(output_dir, round_number)
    found = {}
    for patient in patients:
        path = directory / f"{file_stem(patient)}.json"
        if path.is_file():
            found[patient] = PatientExplanation.from_json(json.loads(path.read_text()))
    return found


def previous_round(output_dir: Path, round_number: int) -> int | None:
    """The latest round before ``round_number`` with a directory in ``output_dir``."""
    earlier = [
        int(match.group(1))
        for path in output_dir.glob("round_*")
        if (match := re.fullmatch(r"round_(\d+)", path.name)) and int(match.group(1)) < round_number
    ]
    return max(earlier, default=None)


class ShapCallback(L.Callback):
    """Explain ``patients`` with the module's weights at the end of each local round.

    The round number comes from ``round_provider()`` if given, else from the ``round``
    attribute (set it before ``trainer.fit``). Consistency compares with the latest earlier
    round found in ``output_dir``, so it works when every round runs in a fresh process.

    Args:
        output_dir: Where ``round_NNN/`` folders go (a site-local folder).
        patients: The bundle of patients to explain (``uint8`` images, token ids; ``index`` or
            ``patient`` ids).
        image_baseline: ``mean``, ``blur`` or ``black``.
        text_baseline: ``mask`` or ``remove``.
        max_evals: Model evaluations per patient and modality (bounds the cost of a round).
        top_k: Top-k size of the quality metrics.
        share_summary: Whether :meth:`shareable_metrics` returns the aggregates (else nothing leaves).
        tokenizer: The text encoder's tokenizer, or a :class:`TokenVocabulary`; None for an
            image-only model.
        round_provider: Returns the current round.
        patient_ids: One id per patient (default: from the bundle).
        blast_points: Blast centres per patient, in pixels of the bundle's images (synthetic data).
        signal_words: Signal words per patient (synthetic data).
        method: Estimator (see :class:`ExplainSettings`).
        seed: Estimator seed.

    Attributes:
        round: The round used when there is no ``round_provider``.
        summary: The last round's aggregate metrics (``explain/...``).
        explanations: The last round's explanations.
    """

    def __init__(
        self,
        output_dir: Path,
        patients: Bundle,
        image_baseline: str = "mean",
        text_baseline: str = "mask",
        max_evals: int = 1000,
        top_k: int = 5,
        share_summary: bool = True,
        tokenizer: PreTrainedTokenizerBase | TokenVocabulary | None = None,
        round_provider: Callable[[], int] | None = None,
        patient_ids: Sequence[str] | None = None,
        blast_points: Sequence[Sequence[tuple[float, float]]] | None = None,
        signal_words: Sequence[Sequence[str]] | None = None,
        method: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        size = bundle_size(patients)
        for name, values in (
            ("patient_ids", patient_ids),
            ("blast_points", blast_points),
            ("signal_words", signal_words),
        ):
            if values is not None and len(values) != size:
                raise DataError(f"ShapCallback got {len(values)} {name} for {size} patients")
        if top_k < 1:
            raise ConfigError(f"ShapCallback top_k must be >= 1, got {top_k}")
        self.output_dir = Path(output_dir)
        self.patients = dict(patients)
        self.settings = ExplainSettings(
            image_baseline=image_baseline, text_baseline=text_baseline, max_evals=max_evals, method=method, seed=seed
        )
        self.top_k = top_k
        self.share_summary = share_summary
        self.vocabulary = (
            TokenVocabulary.from_tokenizer(tokenizer) if isinstance(tokenizer, PreTrainedTokenizerBase) else tokenizer
        )
        self.round_provider = round_provider
        self.patient_ids = list(patient_ids) if patient_ids is not None else None
        self.blast_points = blast_points
        self.signal_words = signal_words
        self.round = 0
        self.summary: dict[str, float] = {}
        self.explanations: list[PatientExplanation] = []

    def current_round(self) -> int:
        """The round being explained."""
        return int(self.round_provider()) if self.round_provider is not None else self.round

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.explain(pl_module)

    def explain(self, module: torch.nn.Module) -> dict[str, float]:
        """Explain the patients with ``module`` now, write the round's files, return the aggregates.

        The module is left in the train/eval mode and the grad mode it was found in.
        """
        started = time.perf_counter()
        round_number = self.current_round()
        explanations = explain_patients(module, self.patients, self.settings, self.vocabulary, self.patient_ids)
        earlier = previous_round(self.output_dir, round_number)
        previous = (
            load_round(self.output_dir, earlier, [e.patient for e in explanations]) if earlier is not None else None
        )
        summary = summarize(explanations, self.top_k, previous, self.blast_points, self.signal_words)
        summary["explain/seconds"] = time.perf_counter() - started
        write_round(self.output_dir, round_number, explanations, summary)
        logger.info(
            "round %d: explained %d patients in %.1f s (%d model evaluations, efficiency error <= %.1e)",
            round_number,
            len(explanations),
            summary["explain/seconds"],
            summary["explain/model_evals"],
            summary["explain/efficiency_error_max"],
        )
        self.summary, self.explanations = summary, explanations
        return summary

    def shareable_metrics(self) -> dict[str, float]:
        """The aggregates a client may report to the server (empty unless ``share_summary``)."""
        return dict(self.summary) if self.share_summary else {}


def _mean(values: Iterable[float]) -> float:
    collected = list(values)
    return float(np.mean(collected)) if collected else 0.0
