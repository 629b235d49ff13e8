"""Rendering explanations: heatmap PNGs, highlighted reports, per-patient pages and a round index.

Positive attributions (pushing the explained probability up) are red, negative ones blue; the
colour scale of a heatmap or a report is symmetric around 0 and set by its largest ``|φ|``.
Nothing here needs a display: PNGs are composed with PIL and a matplotlib colormap.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from fedvlm.data.records import STAGE_NAMES
from fedvlm.errors import DataError
from fedvlm.explain.shapley import HEADS, ModalityExplanation, PatientExplanation

COLORMAP = "bwr"
HEATMAP_ALPHA = 0.55
HEAD_TITLES = {"detection": "Detection head: P(leukemia)", "stage": "Stage head: P(predicted stage)"}
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.side { display: flex; gap: 2em; flex-wrap: wrap; }
.panel { flex: 1 1 320px; }
img.smear { width: 256px; image-rendering: pixelated; border: 1px solid #ccc; margin-right: .5em; }
.report { line-height: 1.9; }
.report span { padding: 1px 2px; border-radius: 3px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.note { color: #666; font-size: 90%; }
"""


def heatmap_overlay(pixels: np.ndarray, attributions: np.ndarray, grid: tuple[int, int]) -> Image.Image:
    """The image with the patch attributions blended over it, at the image's size.

    Args:
        pixels: ``H×W×3`` ``uint8`` image.
        attributions: ``φ`` ``[rows * cols]``, row-major over the patch grid.
        grid: ``(rows, cols)``.

    Raises:
        DataError: If ``attributions`` does not fit the grid.
    """
    rows, cols = grid
    if len(attributions) != rows * cols:
        raise DataError(f"{len(attributions)} attributions do not fill a {rows}x{cols} patch grid")
    height, width = pixels.shape[:2]
    scale = float(np.abs(attributions).max()) or 1.0
    colours = matplotlib.colormaps[COLORMAP](0.5 + 0.5 * np.asarray(attributions).reshape(rows, cols) / scale)
    patch_colours = Image.fromarray((colours[..., :3] * 255).astype(np.uint8))
    heat = np.asarray(patch_colours.resize((width, height), Image.Resampling.NEAREST), dtype=np.float64)
    blended = (1 - HEATMAP_ALPHA) * pixels.astype(np.float64) + HEATMAP_ALPHA * heat
    return Image.fromarray(np.clip(blended, 0, 255).round().astype(np.uint8))


def save_heatmap_png(pixels: np.ndarray, attributions: np.ndarray, grid: tuple[int, int], path: Path) -> Path:
    """Write :func:`heatmap_overlay` as a PNG; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_overlay(pixels, attributions, grid).save(path, format="PNG")
    return path


def highlight_words_html(words: Sequence[str], attributions: np.ndarray) -> str:
    """The words as HTML spans shaded red (positive) or blue (negative) by ``|φ|``, HTML-escaped,
    each with its value as a tooltip.

    Raises:
        DataError: If there is not one attribution per word.

    Example:
        >>> highlight_words_html(["blasts", "<b>"], np.array([0.2, -0.1]))  # doctest: +ELLIPSIS
        '<span ... title="+0.2000">blasts</span> <span ... title="-0.1000">&lt;b&gt;</span>'
    """
    if len(words) != len(attributions):
        raise DataError(f"{len(attributions)} attributions for {len(words)} words")
    scale = float(np.abs(attributions).max()) if len(attributions) else 0.0
    spans = []
    for word, phi in zip(words, attributions, strict=True):
        strength = abs(float(phi)) / scale if scale > 0 else 0.0
        rgb = "220,40,40" if phi > 0 else "40,90,220"
        spans.append(
            f'<span style="background: rgba({rgb},{0.85 * strength:.3f})" title="{float(phi):+.4f}">'
            f"{html.escape(word)}</span>"
        )
    return " ".join(spans)


def stage_name(stage: int) -> str:
    """Display name of a 0-based stage (``I``..``IV``, then numbers)."""
    return STAGE_NAMES[stage] if 0 <= stage < len(STAGE_NAMES) else str(stage + 1)


def patient_html(
    explanation: PatientExplanation, heatmaps: Mapping[str, str], round_number: int, original: str | None = None
) -> str:
    """One patient's page: prediction, image heatmaps and highlighted report side by side, for
    both heads, and the efficiency check of every game.

    Args:
        explanation: The patient's explanation.
        heatmaps: Head name → PNG file name (relative to the page).
        round_number: The federated round.
        original: File name of the unannotated image, if written.
    """
    e = explanation
    stages = ", ".join(f"{stage_name(s)}: {p:.3f}" for s, p in enumerate(e.stage_probabilities))
    label = "" if e.leukemia is None else f" · label {'leukemia' if e.leukemia else 'healthy'}"
    if e.stage is not None and e.stage >= 0:
        label += f", stage {stage_name(e.stage)}"
    parts = [
        f"<h1>Patient {html.escape(e.patient)} · round {round_number}</h1>",
        f"<p>P(leukemia) = {e.leukemia_probability:.3f} · predicted stage {stage_name(e.predicted_stage)} "
        f"· stage probabilities {stages}{html.escape(label)}</p>",
    ]
    for head in HEADS:
        parts.append(f"<h2>{HEAD_TITLES[head]}</h2><div class='side'>")
        if e.image is not None:
            images = f"<img class='smear' src='{html.escape(original)}' alt='smear'>" if original else ""
            if head in heatmaps:
                images += f"<img class='smear' src='{html.escape(heatmaps[head])}' alt='{head} heatmap'>"
            parts.append(f"<div class='panel'><h3>Image patches</h3>{images}{_values_line(e.image, head)}</div>")
        if e.text is not None:
            highlighted = highlight_words_html(e.text.features, e.text.attributions[head])
            parts.append(
                f"<div class='panel'><h3>Report words</h3><p class='report'>{highlighted}</p>"
                f"{_values_line(e.text, head)}</div>"
            )
        parts.append("</div>")
    parts.append(
        "<p class='note'>Each modality is its own game (the other held at the actual input), so image and "
        "word attributions are not ranked against each other. Red raises, blue lowers the probability.</p>"
    )
    return _page(f"Patient {e.patient} · round {round_number}", "\n".join(parts))


def index_html(
    round_number: int,
    explanations: Sequence[PatientExplanation],
    pages: Mapping[str, str],
    summary: Mapping[str, float],
) -> str:
    """The round's index: one row per patient (prediction, link) and the aggregate metrics.

    Args:
        round_number: The federated round.
        explanations: The round's patients.
        pages: Patient id → page file name.
        summary: Aggregate quality metrics.
    """
    rows = []
    for e in explanations:
        page = html.escape(pages.get(e.patient, ""))
        label = "" if e.leukemia is None else ("leukemia" if e.leukemia else "healthy")
        rows.append(
            f"<tr><td style='text-align:left'><a href='{page}'>{html.escape(e.patient)}</a></td>"
            f"<td>{html.escape(label)}</td><td>{e.leukemia_probability:.3f}</td>"
            f"<td>{stage_name(e.predicted_stage)} ({e.stage_probabilities[e.predicted_stage]:.3f})</td></tr>"
        )
    metrics = "".join(
        f"<tr><td style='text-align:left'>{html.escape(name)}</td><td>{value:.4g}</td></tr>"
        for name, value in sorted(summary.items())
    )
    body = (
        f"<h1>Explanations · round {round_number}</h1>"
        "<table><tr><th>patient</th><th>label</th><th>P(leukemia)</th><th>predicted stage</th></tr>"
        f"{''.join(rows)}</table><h2>Aggregate quality</h2><table>{metrics}</table>"
    )
    return _page(f"Explanations · round {round_number}", body)


def _values_line(modality: ModalityExplanation, head: str) -> str:
    return (
        f"<p class='note'>f(x) = {modality.full_value[head]:.4f}, f(baseline: {html.escape(modality.baseline)}) = "
        f"{modality.baseline_value[head]:.4f}, Σφ − (f(x) − f(baseline)) error {modality.efficiency_error[head]:.1e}; "
        f"{html.escape(modality.method)}, {modality.model_evals} evaluations</p>"
    )


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
