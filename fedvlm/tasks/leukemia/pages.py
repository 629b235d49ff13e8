"""The pages of a round's leukemia explanations: one per patient (both heads, both modalities)
and a round index; heatmaps and highlighted words are :mod:`fedvlm.explain.render`'s."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

from fedvlm.explain.render import highlight_words_html, html_page
from fedvlm.tasks.leukemia.explain import HEADS, ModalityExplanation, PatientExplanation
from fedvlm.tasks.leukemia.records import STAGE_NAMES

HEAD_TITLES = {"detection": "Detection head: P(leukemia)", "stage": "Stage head: P(predicted stage)"}


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
    return html_page(f"Patient {e.patient} · round {round_number}", "\n".join(parts))


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
    return html_page(f"Explanations · round {round_number}", body)


def _values_line(modality: ModalityExplanation, head: str) -> str:
    return (
        f"<p class='note'>f(x) = {modality.full_value[head]:.4f}, f(baseline: {html.escape(modality.baseline)}) = "
        f"{modality.baseline_value[head]:.4f}, Σφ − (f(x) − f(baseline)) error {modality.efficiency_error[head]:.1e}; "
        f"{html.escape(modality.method)}, {modality.model_evals} evaluations</p>"
    )
