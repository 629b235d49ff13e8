"""Pointing accuracy and mIoU against hand-computed values; the run-level explainer end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedvlm.errors import ConfigError, DataError
from fedvlm.tasks.cxr.explain import explain_cxr_run
from fedvlm.tasks.cxr.records import CxrRecord, LesionBox
from fedvlm.tasks.cxr.scores import (
    HeatmapThreshold,
    LocalizationScores,
    box_mask,
    chance_iou,
    iou,
    label_regions,
    pointing_score,
)
from tests.conftest import CXR_TINY

RAMP = np.arange(16, dtype=np.float64).reshape(4, 4)
"""0..15 row-major: the top quarter is the bottom row."""


def square(top: int, left: int, side: int, size: int = 4) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def bottom_row() -> np.ndarray:
    mask = np.zeros((4, 4), dtype=bool)
    mask[3] = True
    return mask


def test_pointing_is_a_hit_only_when_the_maximum_is_inside_the_region() -> None:
    assert pointing_score(RAMP, square(2, 2, 2)) == 1.0  # the maximum (15) is at (3, 3)
    assert pointing_score(RAMP, square(0, 0, 2)) == 0.0


def test_tied_maxima_share_the_hit_so_a_flat_map_scores_the_area_fraction() -> None:
    heatmap = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert pointing_score(heatmap, square(0, 0, 1, size=3)) == 0.5
    assert pointing_score(np.zeros((4, 4)), square(0, 0, 2)) == 4 / 16


def test_top_fraction_threshold_and_iou_match_a_hand_computation() -> None:
    prediction = HeatmapThreshold("top", 0.25).binarize(RAMP)
    assert prediction.tolist() == bottom_row().tolist()
    # bottom row {12..15} against the bottom-right 2x2 {10, 11, 14, 15}: 2 shared of 6
    assert iou(prediction, square(2, 2, 2)) == pytest.approx(2 / 6)


def test_relative_threshold_keeps_pixels_at_least_t_times_the_maximum() -> None:
    prediction = HeatmapThreshold("relative", 0.6).binarize(RAMP)  # >= 9
    assert prediction.sum() == 7 and prediction.ravel()[9:].all()
    assert iou(prediction, square(2, 2, 2)) == pytest.approx(4 / 7)


def test_threshold_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="mode 'otsu'"):
        HeatmapThreshold("otsu", 0.5)
    with pytest.raises(ConfigError, match=r"mode=top must be in \(0, 1\]"):
        HeatmapThreshold("top", 0.0)


def test_iou_of_two_empty_masks_is_one_and_shapes_must_match() -> None:
    assert iou(np.zeros(3, dtype=bool), np.zeros(3, dtype=bool)) == 1.0
    with pytest.raises(DataError, match="does not match"):
        pointing_score(np.zeros((2, 2)), np.zeros((3, 3), dtype=bool))


def test_chance_iou_is_the_expected_iou_of_independent_pixels() -> None:
    rng = np.random.default_rng(0)
    p, a = 0.3, 0.2
    draws = [iou(rng.random(20000) < p, rng.random(20000) < a) for _ in range(5)]
    assert chance_iou(p, a) == pytest.approx(p * a / (p + a - p * a))
    assert np.mean(draws) == pytest.approx(chance_iou(p, a), abs=0.01)


def test_a_box_is_scaled_into_the_model_image() -> None:
    # a 4x4 box at (2, 2) in an 8x8 original covers pixels 1..2 of a 4x4 model input
    mask = box_mask(LesionBox("Mass", 2.0, 2.0, 4.0, 4.0), (4, 4), scale=(0.5, 0.5))
    assert mask.tolist() == square(1, 1, 2).tolist()


def test_regions_come_from_the_lesion_mask_by_finding_index() -> None:
    lesion_mask = np.zeros((4, 4), dtype=np.uint8)
    lesion_mask[:2, :2] = 1  # Cardiomegaly
    lesion_mask[3, 3] = 5  # Pneumothorax
    record = CxrRecord(image=np.zeros((4, 4), np.uint8), report="", labels=(1.0,), patient="p", lesion_mask=lesion_mask)
    regions = label_regions(record, ["Pneumothorax", "Cardiomegaly", "Edema"], image_size=4)
    assert sorted(regions) == ["Cardiomegaly", "Pneumothorax"]
    assert regions["Cardiomegaly"].tolist() == square(0, 0, 2).tolist()
    resized = label_regions(record, ["Cardiomegaly"], image_size=8)["Cardiomegaly"]
    assert resized.sum() == 16 and resized[:4, :4].all()


def test_regions_come_from_boxes_when_there_is_no_mask() -> None:
    boxes = (
        LesionBox("Mass", 0.0, 0.0, 50.0, 50.0),
        LesionBox("Mass", 150.0, 150.0, 50.0, 50.0),
        LesionBox("Hernia", 0.0, 0.0, 10.0, 10.0),
    )
    record = CxrRecord(image=Path("x.png"), report="", labels=(1.0,), patient="p", boxes=boxes)
    regions = label_regions(record, ["Mass"], image_size=4, original_size=(200, 200))
    assert list(regions) == ["Mass"]
    assert regions["Mass"].tolist() == (square(0, 0, 1) | square(3, 3, 1)).tolist()
    with pytest.raises(DataError, match="original image size"):
        label_regions(record, ["Mass"], image_size=4)


def test_scores_average_within_labels_then_over_labels() -> None:
    scores = LocalizationScores(HeatmapThreshold("top", 0.25))
    hit = scores.add("Edema", RAMP, square(2, 2, 2))  # pointing 1, IoU 2/6
    assert hit["pointing"] == 1.0 and hit["iou"] == pytest.approx(1 / 3)
    assert hit["region_fraction"] == 0.25 and hit["chance_iou"] == pytest.approx(chance_iou(0.25, 0.25))
    scores.add("Edema", RAMP, square(0, 0, 2))  # pointing 0, IoU 0
    scores.add("Pneumothorax", RAMP, bottom_row())  # pointing 1, IoU 1
    summary = scores.summary()
    per_label = summary["per_label"]
    assert per_label["Edema"]["pointing_accuracy"] == 0.5 and per_label["Edema"]["count"] == 2
    assert per_label["Edema"]["miou"] == pytest.approx(1 / 6)
    assert summary["pointing_accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # not 2/3, the pooled mean
    assert summary["miou"] == pytest.approx((1 / 6 + 1.0) / 2)
    assert summary["chance_pointing_accuracy"] == pytest.approx(0.25)
    assert summary["num_heatmaps"] == 3


def test_an_empty_summary_is_nan() -> None:
    summary = LocalizationScores().summary()
    assert math.isnan(summary["pointing_accuracy"])
    assert summary["num_heatmaps"] == 0


@pytest.mark.slow
def test_explain_cxr_run_end_to_end(tmp_path: Path) -> None:
    from fedvlm.cli import main

    run_dir = tmp_path / "run"
    main(
        [
            "fit",
            "--recipe",
            "cxr_demo",
            "--out",
            str(run_dir),
            *CXR_TINY,
        ]
    )
    out_dir = tmp_path / "explain"
    scores = explain_cxr_run(run_dir, num_images=8, out_dir=out_dir)

    assert scores["num_images"] == 8
    written = json.loads((out_dir / "scores.json").read_text())
    assert len(written["images"]) == 8
    assert "<img" in (out_dir / "index.html").read_text()
    pngs = {path.name for path in (out_dir / "images").glob("*.png")}
    assert any("_gradcam_" in name for name in pngs) and any("_phrase_" in name for name in pngs)
    for kind in ("gradcam", "grounding"):
        summary = scores[kind]
        for key in ("pointing_accuracy", "miou", "chance_pointing_accuracy", "chance_miou"):
            assert 0.0 <= summary[key] <= 1.0, (kind, key)
        for row in summary["per_label"].values():
            assert 0.0 <= row["pointing_accuracy"] <= 1.0 and 0.0 <= row["miou"] <= 1.0
    grounding = scores["grounding"]
    assert 0.0 <= grounding["text_alignment_accuracy"] <= 1.0
    assert 0.0 < grounding["chance_text_alignment_accuracy"] < 1.0
    assert grounding["chance_phrase_image_ranking"] == 0.5
    assert 0.0 <= grounding["phrase_image_ranking"] <= 1.0
