"""The synthetic leukemia generator: determinism, latent calibration, and what each modality says."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from fedvlm.data.generators import report_tokens
from fedvlm.errors import ConfigError
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.leukemia import synthetic as synthetic_leukemia
from fedvlm.tasks.leukemia.records import LeukemiaRecord
from fedvlm.tasks.leukemia.synthetic import (
    SynthLeukemiaConfig,
    generate_leukemia,
    generate_leukemia_with_truth,
    leukemia_label_index,
    report_vocabulary,
)

# The calibration as specified, written out here rather than imported from the module under test.
BLAST_PERCENT_RANGE = {None: (0, 3), 0: (5, 19), 1: (20, 39), 2: (40, 59), 3: (60, 90)}
BLAST_COUNT_RANGE = {0: (1, 2), 1: (3, 5), 2: (5, 7), 3: (8, 11)}
PERCENT_PATTERN = re.compile(r"(\d+)\s?%")

Cohort = tuple[list[LeukemiaRecord], np.ndarray, np.ndarray]
"""Records, ``informative_image``, ``informative_report``."""


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return generate_leukemia_with_truth(SynthLeukemiaConfig(n=2000, seed=11))


def _labels(records: list[LeukemiaRecord]) -> np.ndarray:
    return np.array([record.leukemia for record in records])


def _image(record: LeukemiaRecord) -> np.ndarray:
    assert isinstance(record.image, np.ndarray)
    return record.image


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (brute force)."""
    positive, negative = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean(positive > negative) + 0.5 * np.mean(positive == negative))


def test_same_seed_gives_identical_records_and_another_seed_does_not() -> None:
    first = generate_leukemia(SynthLeukemiaConfig(n=12, seed=4))
    again = generate_leukemia(SynthLeukemiaConfig(n=12, seed=4))
    other = generate_leukemia(SynthLeukemiaConfig(n=12, seed=5))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(_image(a), _image(b))
        assert (a.report, a.leukemia, a.stage, a.blast_points) == (b.report, b.leukemia, b.stage, b.blast_points)
    assert [r.report for r in first] != [r.report for r in other]
    assert not all(np.array_equal(_image(a), _image(b)) for a, b in zip(first, other, strict=True))


def test_records_do_not_depend_on_how_many_are_generated() -> None:
    few = generate_leukemia(SynthLeukemiaConfig(n=3, seed=2))
    more = generate_leukemia(SynthLeukemiaConfig(n=7, seed=2))
    for a, b in zip(few, more[:3], strict=True):
        np.testing.assert_array_equal(_image(a), _image(b))
        assert a.report == b.report


def test_record_fields_and_image_size() -> None:
    records = generate_leukemia(SynthLeukemiaConfig(n=12, image_size=128, num_sites=4, seed=1))
    assert [r.patient for r in records[:2]] == ["synth00000", "synth00001"]
    assert [r.source for r in records[:2]] == ["synthetic:0", "synthetic:1"]
    assert [r.site for r in records[:5]] == ["site00", "site01", "site02", "site03", "site00"]
    for record in records:
        record.validate()
        assert _image(record).shape == (128, 128, 3) and _image(record).dtype == np.uint8
        assert (record.stage is None) == (record.leukemia == 0)


def test_blasts_scale_with_image_size() -> None:
    def blast_pixels(size: int) -> float:
        records = generate_leukemia(SynthLeukemiaConfig(n=40, image_size=size, seed=8))
        return float(np.mean(_dark_purple_fraction(np.stack([_image(r) for r in records]))))

    # Cells scale with the image, so the share of nucleus pixels stays about the same.
    assert blast_pixels(128) == pytest.approx(blast_pixels(64), rel=0.25)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", -1), ("seed", -1), ("image_size", 8), ("positive_fraction", 1.5), ("p_ambiguous_image", -0.1)],
)
def test_invalid_config_names_the_field(field: str, value: float) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        SynthLeukemiaConfig(**overrides)


def test_class_balance_and_stage_shares(cohort: Cohort) -> None:
    records, _, _ = cohort
    labels = _labels(records)
    assert labels.mean() == pytest.approx(0.55, abs=0.04)
    stages = np.array([r.stage for r in records if r.leukemia])
    shares = np.bincount(stages, minlength=4) / len(stages)
    assert shares == pytest.approx([0.25] * 4, abs=0.05)


def test_ambiguity_rates_are_realised_and_independent(cohort: Cohort) -> None:
    _, informative_image, informative_report = cohort
    ambiguous_image, omitted_report = ~informative_image, ~informative_report
    assert ambiguous_image.mean() == pytest.approx(0.25, abs=0.03)
    assert omitted_report.mean() == pytest.approx(0.35, abs=0.03)
    joint = (ambiguous_image & omitted_report).mean()
    assert joint == pytest.approx(0.25 * 0.35, abs=0.02)
    assert joint == pytest.approx(ambiguous_image.mean() * omitted_report.mean(), abs=0.015)


def test_blast_points_follow_the_stage(cohort: Cohort) -> None:
    records, informative_image, _ = cohort
    for record, informative in zip(records, informative_image, strict=True):
        points = np.array(record.blast_points).reshape(-1, 2)
        assert np.all((points >= 0) & (points < 64))
        if record.leukemia == 0:
            assert len(points) == 0
        elif informative:
            assert record.stage is not None
            low, high = BLAST_COUNT_RANGE[record.stage]
            assert low <= len(points) <= high, (record.stage, len(points))
        else:
            assert len(points) <= 2  # a few lymphocyte-like blasts at most


def test_informative_reports_state_the_stage_and_omitted_ones_do_not(cohort: Cohort) -> None:
    records, _, informative_report = cohort
    for record, informative in zip(records, informative_report, strict=True):
        percents = [int(value) for value in PERCENT_PATTERN.findall(record.report)]
        if not informative:
            assert percents == [] and "blast" not in record.report.lower()
            assert record.signal_words == ()
            continue
        tokens = report_tokens(record.report)
        assert set(record.signal_words) <= set(tokens) and record.signal_words
        if "no blasts seen" in record.report.lower():
            assert record.leukemia == 0
            continue
        assert len(percents) == 1
        low, high = BLAST_PERCENT_RANGE[record.stage]
        assert low <= percents[0] <= high
        assert str(percents[0]) in record.signal_words


def test_reports_contain_negated_symptoms_in_both_classes(cohort: Cohort) -> None:
    records, _, _ = cohort
    for label in (0, 1):
        reports = [r.report for r in records if r.leukemia == label]
        assert any("Denies " in report for report in reports)
        assert any(re.search(r"\bNo (fatigue|pallor|fever|bruising|bone|night)", r) for r in reports)


def test_weak_report_evidence_favours_positives_but_overlaps(cohort: Cohort) -> None:
    records, _, informative_report = cohort
    labels = _labels(records)
    omitted = ~informative_report
    # Number of symptoms reported as present: more in positives, far from decisive.
    present = np.array([_present_symptom_count(r.report) for r in records])
    auroc = _auroc(present[omitted], labels[omitted])
    assert 0.52 < auroc < 0.75


def _present_symptom_count(report: str) -> int:
    sentences = [s for s in report.split(". ") if not s.startswith(("Denies", "No "))]
    symptoms = ("fatigue", "pallor", "fever", "bruising", "bone pain", "night sweats")
    return sum(symptom in sentence for sentence in sentences for symptom in symptoms)


def test_sites_differ_in_background_colour_and_report_template(cohort: Cohort) -> None:
    records, _, _ = cohort
    by_site: dict[str, list[LeukemiaRecord]] = {}
    for record in records:
        by_site.setdefault(str(record.site), []).append(record)
    background = {site: np.stack([_background_colour(_image(r)) for r in group]) for site, group in by_site.items()}
    first, second = background["site00"], background["site01"]
    within_std = np.concatenate([first, second]).std(axis=0).max()
    assert np.abs(first.mean(axis=0) - second.mean(axis=0)).max() > within_std / 10
    first_words = {site: {r.report.split()[0] for r in group} for site, group in by_site.items()}
    assert first_words["site00"].isdisjoint(first_words["site01"])


def _background_colour(image: np.ndarray) -> np.ndarray:
    """Mean RGB of the brightest tenth of the pixels (the glass between cells)."""
    pixels = image.reshape(-1, 3).astype(float)
    brightness = pixels.sum(axis=1)
    return pixels[brightness >= np.quantile(brightness, 0.9)].mean(axis=0)


def _dark_purple_fraction(images: np.ndarray) -> np.ndarray:
    """Share of nucleus-coloured pixels (blue well above green, green dark) per image."""
    green, blue = images[..., 1].astype(int), images[..., 2].astype(int)
    return (((blue - green) > 40) & (green < 160)).mean(axis=(1, 2))


def test_image_evidence_separates_classes_only_when_informative(cohort: Cohort) -> None:
    records, informative_image, _ = cohort
    labels = _labels(records)
    purple = _dark_purple_fraction(np.stack([_image(r) for r in records]))
    informative_auroc = _auroc(purple[informative_image], labels[informative_image])
    ambiguous_auroc = _auroc(purple[~informative_image], labels[~informative_image])
    assert informative_auroc > 0.95
    assert abs(ambiguous_auroc - 0.5) < 0.1
    assert informative_auroc - ambiguous_auroc > 0.35


def test_vocabulary_covers_every_report_token(cohort: Cohort) -> None:
    records, _, _ = cohort
    vocabulary = set(report_vocabulary())
    unseen = {token for r in records[:500] for token in report_tokens(r.report)} - vocabulary
    assert unseen == set()
    assert {"blasts", "45", "%", "denies", "fever"} <= vocabulary
    assert report_vocabulary() == sorted(vocabulary)


def test_vocabulary_tokenizer_knows_every_generated_report() -> None:
    tokenizer = build_word_tokenizer(report_vocabulary())
    records = generate_leukemia(SynthLeukemiaConfig(n=300, image_size=32, seed=21))
    for record in records:
        ids = tokenizer(record.report)["input_ids"]
        assert tokenizer.unk_token_id not in ids, record.report


def _assert_same_record(subset: LeukemiaRecord, full: LeukemiaRecord) -> None:
    np.testing.assert_array_equal(_image(subset), _image(full))
    fields = ("report", "leukemia", "stage", "patient", "site", "source", "blast_points", "signal_words")
    assert [getattr(subset, name) for name in fields] == [getattr(full, name) for name in fields]


def test_indices_generate_exactly_those_records_of_full_generation() -> None:
    config = SynthLeukemiaConfig(n=20, image_size=32, num_sites=3, seed=6)
    full, full_image, full_report = generate_leukemia_with_truth(config)
    indices = [17, 3, 3, 0, 19]  # any order, repeats allowed
    subset, subset_image, subset_report = generate_leukemia_with_truth(config, indices=indices)
    assert [record.source for record in subset] == [f"synthetic:{i}" for i in indices]
    for record, index in zip(subset, indices, strict=True):
        _assert_same_record(record, full[index])
    np.testing.assert_array_equal(subset_image, full_image[indices])
    np.testing.assert_array_equal(subset_report, full_report[indices])
    assert [r.report for r in generate_leukemia(config, indices=[5, 2])] == [full[5].report, full[2].report]
    assert generate_leukemia_with_truth(config, indices=[])[0] == []


def test_indices_outside_the_cohort_are_refused() -> None:
    with pytest.raises(IndexError, match=r"\[20, -1\] out of range for n=20"):
        generate_leukemia(SynthLeukemiaConfig(n=20, image_size=32), indices=[0, 20, -1])


def test_label_index_matches_full_generation_without_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SynthLeukemiaConfig(n=60, image_size=32, num_sites=4, seed=9)
    records = generate_leukemia(config)

    def no_rendering(*args: object, **kwargs: object) -> None:
        raise AssertionError("the label index rendered an image")

    monkeypatch.setattr(synthetic_leukemia, "render_smear", no_rendering)
    index = leukemia_label_index(config)
    assert index.leukemia.dtype == np.int64 and index.stage.dtype == np.int64
    np.testing.assert_array_equal(index.leukemia, [r.leukemia for r in records])
    np.testing.assert_array_equal(index.stage, [-1 if r.stage is None else r.stage for r in records])
    assert index.patient.tolist() == [r.patient for r in records]
    assert index.site.tolist() == [r.site for r in records]
    assert 0 < index.leukemia.sum() < 60 and set(index.stage[index.leukemia == 0].tolist()) == {-1}
    assert index.site[:5].tolist() == ["site00", "site01", "site02", "site03", "site00"]
