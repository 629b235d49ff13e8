"""Rendering: PNG size, HTML escaping and content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvlm.errors import DataError
from fedvlm.explain.render import heatmap_overlay, highlight_words_html, save_heatmap_png
from fedvlm.tasks.leukemia.explain import ModalityExplanation, PatientExplanation
from fedvlm.tasks.leukemia.pages import index_html, patient_html


def modality(
    name: str, features: list[str], phi: list[float], grid: tuple[int, int] | None = None
) -> ModalityExplanation:
    values = np.array(phi)
    return ModalityExplanation(
        modality=name,
        features=features,
        attributions={"detection": values, "stage": -values},
        full_value={"detection": 0.9, "stage": 0.6},
        baseline_value={"detection": 0.9 - values.sum(), "stage": 0.6 + values.sum()},
        efficiency_error={"detection": 0.0, "stage": 0.0},
        baseline="mask" if name == "text" else "mean",
        method="exact",
        model_evals=18,
        seconds=0.1,
        grid=grid,
    )


def patient() -> PatientExplanation:
    return PatientExplanation(
        patient="p<1>",
        leukemia_probability=0.9,
        stage_probabilities=[0.1, 0.6, 0.2, 0.1],
        predicted_stage=1,
        image=modality("image", ["r0c0", "r0c1", "r1c0", "r1c1"], [0.3, 0.0, -0.1, 0.05], grid=(2, 2)),
        text=modality("text", ["blasts", "45", "<script>"], [0.4, 0.2, -0.1]),
        leukemia=1,
        stage=1,
        pixels=np.full((12, 12, 3), 128, dtype=np.uint8),
    )


def test_heatmap_png_has_the_image_size_and_colours_the_right_patch(tmp_path: Path) -> None:
    pixels = np.full((30, 20, 3), 128, dtype=np.uint8)
    path = save_heatmap_png(pixels, np.array([1.0, 0.0, 0.0, 0.0, 0.0, -1.0]), (3, 2), tmp_path / "h.png")
    with Image.open(path) as image:
        assert image.size == (20, 30) and image.format == "PNG"
        overlay = np.asarray(image.convert("RGB")).astype(int)
    top_left, bottom_right, middle = overlay[2, 2], overlay[27, 17], overlay[15, 5]
    assert top_left[0] > top_left[2]  # red: positive
    assert bottom_right[2] > bottom_right[0]  # blue: negative
    assert abs(middle[0] - middle[2]) < 5  # white-ish: zero
    with pytest.raises(DataError, match="3x2 patch grid"):
        heatmap_overlay(pixels, np.ones(5), (3, 2))


def test_highlighted_words_are_escaped_and_coloured_by_sign() -> None:
    html = highlight_words_html(["blasts", "<b>&"], np.array([0.5, -0.25]))
    assert "&lt;b&gt;&amp;" in html and "<b>" not in html
    assert 'rgba(220,40,40,0.850)" title="+0.5000">blasts' in html
    assert 'rgba(40,90,220,0.425)" title="-0.2500">' in html
    with pytest.raises(DataError, match="2 attributions for 1 words"):
        highlight_words_html(["x"], np.ones(2))


def test_patient_page_shows_both_heads_both_modalities_and_escapes() -> None:
    page = patient_html(patient(), {"detection": "p_detection.png", "stage": "p_stage.png"}, 3, "p_image.png")
    assert "Patient p&lt;1&gt; · round 3" in page and "<1>" not in page
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "P(leukemia) = 0.900" in page and "predicted stage II" in page and "III: 0.200" in page
    assert "Detection head" in page and "Stage head" in page
    assert "p_detection.png" in page and "p_stage.png" in page and "p_image.png" in page
    assert ">blasts</span>" in page and 'title="-0.4000">blasts' in page  # stage head: negated values


def test_index_lists_patients_and_aggregates() -> None:
    page = index_html(2, [patient()], {"p<1>": "p_1_.html"}, {"explain/sparsity": 0.75})
    assert "href='p_1_.html'" in page and "p&lt;1&gt;" in page
    assert "explain/sparsity" in page and "0.75" in page and "0.900" in page
