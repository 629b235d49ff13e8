"""The synthetic chest X-ray generator: determinism, calibration, masks, reports, sites, manifest."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedvlm.data.generators import report_tokens
from fedvlm.errors import ConfigError, DataError
from fedvlm.models.tokenizer import build_word_tokenizer
from fedvlm.tasks.cxr import synthetic as synthetic_cxr
from fedvlm.tasks.cxr.manifest import read_cxr_manifest, write_cxr_manifest
from fedvlm.tasks.cxr.records import CHEXPERT_LABELS, CxrDataset, CxrRecord
from fedvlm.tasks.cxr.render import CxrStyle, FindingSpec, render_cxr, sample_anatomy
from fedvlm.tasks.cxr.synthetic import (
    SYNTH_CXR_LABELS,
    CxrStudyTruth,
    SynthCxrConfig,
    cxr_label_index,
    generate_cxr,
    generate_cxr_with_truth,
    site_prevalences,
)
from fedvlm.tasks.cxr.synthetic_reports import NO_FINDING_PROMPTS, default_prompts, report_vocabulary

FINDINGS = ("Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumothorax")
PREVALENCE = {"Cardiomegaly": 0.2, "Consolidation": 0.15, "Edema": 0.12, "Pleural Effusion": 0.2, "Pneumothorax": 0.1}
# Words by which a report sentence talks about each finding, whatever the hospital's template.
MENTIONS = {
    "Cardiomegaly": re.compile(r"heart|cardiac|cardiomegaly", re.IGNORECASE),
    "Consolidation": re.compile(r"consolidation", re.IGNORECASE),
    "Edema": re.compile(r"edema|oedema", re.IGNORECASE),
    "Pleural Effusion": re.compile(r"effusion", re.IGNORECASE),
    "Pneumothorax": re.compile(r"pneumothorax|PTX"),
}
NEGATION = re.compile(r"\bno\b|\bnot\b|normal", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<!pulm)(?<!Bilat)\.(?:\s+|$)")
"""A full stop ends a sentence unless it ends an abbreviation ("pulm. edema", "Bilat. pleural")."""

Cohort = tuple[CxrDataset, list[CxrStudyTruth]]


@pytest.fixture(scope="module")
def cohort() -> Cohort:
    return generate_cxr_with_truth(SynthCxrConfig(n=1500, seed=3))


def _image(record: CxrRecord) -> np.ndarray:
    assert isinstance(record.image, np.ndarray)
    return record.image


def _mask(record: CxrRecord) -> np.ndarray:
    assert record.lesion_mask is not None
    return record.lesion_mask


def _present(record: CxrRecord) -> set[str]:
    return {label for label, value in zip(SYNTH_CXR_LABELS, record.labels, strict=True) if value == 1.0}


def test_same_seed_gives_identical_records_and_another_seed_does_not() -> None:
    first = generate_cxr(SynthCxrConfig(n=10, seed=4)).records
    again = generate_cxr(SynthCxrConfig(n=10, seed=4)).records
    other = generate_cxr(SynthCxrConfig(n=10, seed=5)).records
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(_image(a), _image(b))
        np.testing.assert_array_equal(_mask(a), _mask(b))
        assert (a.report, a.labels, a.boxes, a.finding_phrases) == (b.report, b.labels, b.boxes, b.finding_phrases)
    assert [r.report for r in first] != [r.report for r in other]
    assert not any(np.array_equal(_image(a), _image(b)) for a, b in zip(first, other, strict=True))


def test_records_do_not_depend_on_how_many_are_generated() -> None:
    few = generate_cxr(SynthCxrConfig(n=3, seed=2)).records
    more = generate_cxr(SynthCxrConfig(n=8, seed=2)).records
    for a, b in zip(few, more[:3], strict=True):
        np.testing.assert_array_equal(_image(a), _image(b))
        assert (a.report, a.study) == (b.report, b.study)


def test_record_fields_at_another_image_size() -> None:
    dataset = generate_cxr(SynthCxrConfig(n=24, image_size=128, num_sites=4, seed=1))
    dataset.validate()
    assert dataset.label_names == SYNTH_CXR_LABELS and len(dataset.records) == 24
    assert set(FINDINGS) <= set(CHEXPERT_LABELS) and SYNTH_CXR_LABELS[-1] == "No Finding"
    patients: dict[str, set[str]] = {}
    for index, record in enumerate(dataset.records):
        assert _image(record).shape == (128, 128) and _image(record).dtype == np.uint8
        assert _mask(record).shape == (128, 128) and _mask(record).dtype == np.uint8
        assert record.split is None and record.view in ("PA", "AP")
        assert record.source == f"synthetic_cxr:{index}"
        assert record.study.startswith(record.patient)
        patients.setdefault(record.patient, set()).add(str(record.site))
        present = _present(record)
        assert ("No Finding" in present) == (present == {"No Finding"})
    assert all(len(sites) == 1 for sites in patients.values())  # a patient stays at one hospital
    assert len({r.study for r in dataset.records}) == 24
    assert {r.site for r in dataset.records} == {"hospital_00", "hospital_01", "hospital_02", "hospital_03"}


def _assert_same_record(subset: CxrRecord, full: CxrRecord) -> None:
    np.testing.assert_array_equal(_image(subset), _image(full))
    np.testing.assert_array_equal(_mask(subset), _mask(full))
    fields = ("report", "labels", "patient", "study", "site", "view", "source", "boxes", "finding_phrases")
    assert [getattr(subset, name) for name in fields] == [getattr(full, name) for name in fields]


def test_indices_generate_exactly_those_records_of_full_generation() -> None:
    config = SynthCxrConfig(n=30, image_size=32, num_sites=3, seed=6)
    full, full_truths = generate_cxr_with_truth(config)
    followups = [i for i, truth in enumerate(full_truths) if truth.followup]
    assert followups  # a second study is drawn after its patient's first one: it must still match
    indices = [29, followups[0], 4, 4, 0]  # the last record, any order, repeats allowed
    subset, subset_truths = generate_cxr_with_truth(config, indices=indices)
    assert subset.label_names == SYNTH_CXR_LABELS
    assert [record.source for record in subset.records] == [f"synthetic_cxr:{i}" for i in indices]
    for record, truth, index in zip(subset.records, subset_truths, indices, strict=True):
        _assert_same_record(record, full.records[index])
        assert truth == full_truths[index]
    only = generate_cxr(config, indices=[followups[0]]).records
    _assert_same_record(only[0], full.records[followups[0]])
    assert generate_cxr(config, indices=[]).records == []


def test_indices_keep_the_truncated_last_patient() -> None:
    longer, truths = generate_cxr_with_truth(SynthCxrConfig(n=40, image_size=32, seed=2))
    cut = next(i for i, truth in enumerate(truths) if truth.followup)  # n stops before this follow-up
    config = SynthCxrConfig(n=cut, image_size=32, seed=2)
    full = generate_cxr(config).records
    assert len(full) == cut and full[-1].study == longer.records[cut].study.replace("_s1", "_s0")
    _assert_same_record(generate_cxr(config, indices=[cut - 1]).records[0], full[-1])
    assert cxr_label_index(config).patient.tolist() == [r.patient for r in full]
    with pytest.raises(IndexError, match=rf"\[{cut}\] out of range for n={cut}"):
        generate_cxr(config, indices=[cut])


def test_reports_and_labels_do_not_depend_on_image_size() -> None:
    # Rendering draws from each study's own stream, so follow-ups are the same at every size.
    small = generate_cxr(SynthCxrConfig(n=40, image_size=32, seed=7)).records
    large = generate_cxr(SynthCxrConfig(n=40, image_size=64, seed=7)).records
    assert any(r.study.endswith("_s1") for r in small)
    assert [(r.report, r.labels, r.view) for r in small] == [(r.report, r.labels, r.view) for r in large]


def test_label_index_matches_full_generation_without_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    config = SynthCxrConfig(n=80, image_size=32, num_sites=4, seed=8)
    records = generate_cxr(config).records

    def no_rendering(*args: object, **kwargs: object) -> None:
        raise AssertionError("the label index rendered an image")

    monkeypatch.setattr(synthetic_cxr, "render_cxr", no_rendering)
    index = cxr_label_index(config)
    assert index.labels.dtype == np.float32 and index.labels.shape == (80, len(SYNTH_CXR_LABELS))
    np.testing.assert_array_equal(index.labels, [r.labels for r in records])
    assert index.patient.tolist() == [r.patient for r in records]
    assert index.site.tolist() == [r.site for r in records]
    assert len(set(index.patient.tolist())) < 80  # some patients have two studies
    assert index.site[:1].tolist() == ["hospital_00"] and index.labels[:, :-1].any()


@pytest.mark.parametrize("seed", [0, 1])
def test_vocabulary_tokenizer_knows_every_report_and_prompt(seed: int) -> None:
    vocabulary = report_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert {"effusions", "oedema", "ptx", "bilat", "mid", "none", ":", ",", "."} <= set(vocabulary)
    assert not {"[", "]", "{", "}"} & set(vocabulary)  # template markup never reaches a report
    tokenizer = build_word_tokenizer(vocabulary)
    reports = [r.report for r in generate_cxr(SynthCxrConfig(n=300, num_sites=10, image_size=32, seed=seed)).records]
    prompts = [text for sides in (*default_prompts().values(), NO_FINDING_PROMPTS) for side in sides for text in side]
    for text in [*reports, *prompts]:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
        assert set(report_tokens(text)) <= set(vocabulary), text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", -1), ("seed", -1), ("image_size", 16), ("num_sites", 0), ("style_shift", 1.5),
        ("prevalence_shift", -0.1), ("p_followup", 2.0),
    ],
)  # fmt: skip
def test_invalid_config_names_the_field(field: str, value: float) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        SynthCxrConfig(**overrides)


def test_prevalence_must_name_known_findings_in_range() -> None:
    with pytest.raises(ConfigError, match="Pneumonia"):
        SynthCxrConfig(prevalence={"Pneumonia": 0.1})
    with pytest.raises(ConfigError, match="Edema"):
        SynthCxrConfig(prevalence={"Edema": 1.2})
    assert SynthCxrConfig(prevalence={"Edema": 0.5}).prevalence == {**PREVALENCE, "Edema": 0.5}


def test_prevalence_matches_the_config(cohort: Cohort) -> None:
    dataset, _ = cohort
    observed = dataset.label_matrix().mean(axis=0)
    for index, label in enumerate(FINDINGS):
        assert observed[index] == pytest.approx(PREVALENCE[label], abs=0.035), label
    expected_normal = np.prod([1 - p for p in PREVALENCE.values()])
    assert observed[-1] == pytest.approx(expected_normal, abs=0.05)


def test_hospital_prevalence_shift_is_configurable() -> None:
    shifted = site_prevalences(SynthCxrConfig(prevalence_shift=0.8))
    assert shifted.shape == (10, len(FINDINGS))
    assert shifted.std(axis=0).min() > 0.03  # hospitals see different mixes
    assert shifted.mean(axis=0) == pytest.approx(list(PREVALENCE.values()), abs=0.02)
    flat = site_prevalences(SynthCxrConfig(prevalence_shift=0.0))
    np.testing.assert_allclose(flat, np.tile(list(PREVALENCE.values()), (10, 1)))


def test_masks_and_boxes_match_the_labels(cohort: Cohort) -> None:
    dataset, _ = cohort
    for record in dataset.records[:600]:
        present = _present(record) - {"No Finding"}
        mask = _mask(record)
        assert {int(v) for v in np.unique(mask)} - {0} <= {FINDINGS.index(label) + 1 for label in present}
        assert {box.label for box in record.boxes} == present
        for box in record.boxes:
            pixels = mask == FINDINGS.index(box.label) + 1
            assert pixels.any(), box.label
            rows, cols = np.nonzero(pixels)
            x, y = int(box.x), int(box.y)
            assert x <= cols.min() and cols.max() < x + box.width and y <= rows.min() and rows.max() < y + box.height
            if len(present) == 1:  # nothing painted over it: the box is tight around the mask
                assert (x, y, cols.max() + 1 - x, rows.max() + 1 - y) == (cols.min(), rows.min(), box.width, box.height)


def test_overlaps_go_to_the_smaller_finding() -> None:
    anatomy = sample_anatomy(np.random.default_rng(0))
    findings = (
        FindingSpec("Edema", 2, 0.24),
        FindingSpec("Consolidation", 1, 0.06, side="right", zone="middle", centre=(0.14, 0.45), texture_seed=2),
    )
    rendered = render_cxr(np.random.default_rng(1), 64, anatomy, findings, CxrStyle())
    edema, consolidation = rendered.finding_masks["Edema"], rendered.finding_masks["Consolidation"]
    both = edema & consolidation
    assert both.any() and consolidation.sum() < edema.sum()
    assert np.all(rendered.lesion_mask[both] == FINDINGS.index("Consolidation") + 1)
    assert np.all(rendered.lesion_mask[edema & ~consolidation] == FINDINGS.index("Edema") + 1)


def _render_pair(finding: FindingSpec, anatomy_seed: int = 0) -> tuple[Any, Any]:
    anatomy = sample_anatomy(np.random.default_rng(anatomy_seed))
    style = CxrStyle(noise_std=0.0)
    without = render_cxr(np.random.default_rng(7), 64, anatomy, (), style)
    with_finding = render_cxr(np.random.default_rng(7), 64, anatomy, (finding,), style)
    return without, with_finding


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_whitens_the_costophrenic_angle_on_its_side(side: str) -> None:
    without, with_effusion = _render_pair(FindingSpec("Pleural Effusion", 1, 0.12, side=side))
    region = with_effusion.finding_masks["Pleural Effusion"]
    gain = with_effusion.image.astype(float) - without.image.astype(float)
    assert gain[region].mean() > 25  # fluid is bright where air was
    far = np.ones_like(region)
    far[40:, :] = False  # the upper chest is unchanged
    assert np.abs(gain[far]).max() <= 1
    # Radiological convention: the patient's right is on the image's left.
    centre = np.nonzero(region)[1].mean()
    assert (centre < 32) == (side == "right")


def test_pneumothorax_is_darker_than_the_lung_it_replaces() -> None:
    without, with_ptx = _render_pair(FindingSpec("Pneumothorax", 1, 0.3, side="left"))
    region = with_ptx.finding_masks["Pneumothorax"]
    assert (with_ptx.image.astype(float) - without.image)[region].mean() < -10
    assert np.nonzero(region)[1].mean() > 32


def test_heart_is_wider_relative_to_the_chest_in_cardiomegaly(cohort: Cohort) -> None:
    dataset, truths = cohort
    ratios, labels = [], []
    for record, truth in zip(dataset.records, truths, strict=True):
        ratios.append(_heart_to_chest_width(_image(record)))
        labels.append(record.labels[0])
        for box in record.boxes:
            if box.label == "Cardiomegaly":  # measured from the mask against the drawn anatomy
                spec = next(s for s in truth.findings if s.label == "Cardiomegaly")
                assert spec.extent > 0.5 > truth.anatomy.ctr
    assert roc_auc_score(labels, ratios) > 0.85


def _heart_to_chest_width(image: np.ndarray) -> float:
    """Width of the bright band across the lower chest over the width of the dark lung fields."""
    size = image.shape[0]
    band = image[int(0.5 * size) : int(0.66 * size)].astype(float).mean(axis=0)
    dark, bright = np.percentile(band, 15), np.percentile(band, 85)
    centre = band[int(0.3 * size) : int(0.75 * size)]
    lungs = band < dark + 0.5 * (bright - dark)
    return float((centre > dark + 0.6 * (bright - dark)).sum() / max(lungs.sum(), 1))


def test_reports_state_exactly_the_present_findings(cohort: Cohort) -> None:
    dataset, truths = cohort
    negated_somewhere = set()
    for record, truth in zip(dataset.records, truths, strict=True):
        present = _present(record) - {"No Finding"}
        assert {label for label, _ in record.finding_phrases} == present
        for label, phrase in record.finding_phrases:
            assert phrase in record.report and MENTIONS[label].search(phrase)
        findings_text = record.report.split("IMPRESSION")[0].split("CONCLUSION")[0].split("OPINION")[0]
        for sentence in SENTENCE_END.split(findings_text):
            for label, pattern in MENTIONS.items():
                if not pattern.search(sentence):
                    continue
                negated = bool(NEGATION.search(sentence))
                assert negated == (label not in present), (label, sentence, record.report)
                if negated:
                    negated_somewhere.add(label)
        lungs_clear = re.search(r"lungs are (well expanded and )?clear|lungs clear|clear lungs", record.report, re.I)
        if lungs_clear:
            assert not present - {"Cardiomegaly"}
        for spec in truth.findings:  # the side named in the report is the side drawn
            phrase = dict(record.finding_phrases)[spec.label]
            if spec.side in ("right", "left") and spec.label != "Edema":
                assert re.search(rf"\b({spec.side}|{spec.side[0].upper()})\b", phrase, re.I), (spec, phrase)
            if spec.zone is not None:
                assert spec.zone[:3] in phrase.lower().replace("mid ", "mid"), (spec, phrase)
    assert negated_somewhere == set(FINDINGS)


def test_normal_studies_read_as_normal(cohort: Cohort) -> None:
    dataset, _ = cohort
    normal = [r.report for r in dataset.records if r.labels[-1] == 1.0]
    assert normal and all(re.search(r"clear", report, re.I) for report in normal)
    assert all(re.search(r"heart size|cardiac silhouette|heart is not", report, re.I) for report in normal)


def test_localised_findings_are_drawn_where_the_report_says(cohort: Cohort) -> None:
    dataset, truths = cohort
    checked = 0
    for record, truth in zip(dataset.records, truths, strict=True):
        size = _image(record).shape[0]
        for spec in truth.findings:
            if spec.label not in ("Consolidation", "Pneumothorax") or spec.side not in ("right", "left"):
                continue
            box = next(b for b in record.boxes if b.label == spec.label)
            centre_x = box.x + box.width / 2
            assert (centre_x < size / 2) == (spec.side == "right"), (spec, box)
            if spec.zone == "upper":
                assert box.y + box.height / 2 < 0.45 * size
            if spec.zone == "lower":
                assert box.y + box.height / 2 > 0.45 * size
            checked += 1
    assert checked > 100


def test_followups_stay_at_the_hospital_and_keep_cardiomegaly(cohort: Cohort) -> None:
    dataset, truths = cohort
    followups = 0
    for previous, record, truth in zip(dataset.records, dataset.records[1:], truths[1:], strict=False):
        if not truth.followup:
            continue
        followups += 1
        assert previous.patient == record.patient and previous.site == record.site
        assert previous.labels[0] == record.labels[0]
        assert "prior" in record.report
    assert 0.15 < followups / len(dataset.records) < 0.3


def test_hospitals_differ_in_image_style_and_report_template(cohort: Cohort) -> None:
    dataset, _ = cohort
    by_site: dict[str, list[CxrRecord]] = {}
    for record in dataset.records:
        by_site.setdefault(str(record.site), []).append(record)
    brightness = {site: np.array([_image(r).mean() for r in group]) for site, group in by_site.items()}
    noise = {site: np.array([_noise_level(_image(r)) for r in group]) for site, group in by_site.items()}
    means = np.array([values.mean() for values in brightness.values()])
    within = np.mean([values.std() for values in brightness.values()])
    assert means.std() > within  # hospitals differ more than patients within one
    noise_means = sorted(values.mean() for values in noise.values())
    assert noise_means[-1] > 2 * noise_means[0]
    headers = {site: {r.report.split("FINDINGS")[0][:12] for r in group} for site, group in by_site.items()}
    assert headers["hospital_00"].isdisjoint(headers["hospital_01"])


def test_style_shift_zero_makes_hospitals_look_alike() -> None:
    dataset = generate_cxr(SynthCxrConfig(n=200, num_sites=2, style_shift=0.0, prevalence_shift=0.0, seed=5))
    groups = [[_image(r).mean() for r in dataset.records if r.site == site] for site in ("hospital_00", "hospital_01")]
    assert abs(np.mean(groups[0]) - np.mean(groups[1])) < np.std(groups[0]) / 2


def _noise_level(image: np.ndarray) -> float:
    """Median absolute difference of horizontally adjacent pixels (dominated by sensor noise)."""
    return float(np.median(np.abs(np.diff(image.astype(float), axis=1))))


def test_cardiomegaly_is_learnable_from_downsampled_pixels(cohort: Cohort) -> None:
    dataset, _ = cohort
    records = dataset.records[:500]
    pixels = np.stack([_image(r).reshape(16, 4, 16, 4).mean(axis=(1, 3)).ravel() / 255 for r in records])
    labels = np.array([r.labels[0] for r in records])
    model = LogisticRegression(C=1.0, max_iter=2000).fit(pixels[:350], labels[:350])
    assert roc_auc_score(labels[350:], model.predict_proba(pixels[350:])[:, 1]) > 0.75


def test_default_prompts_use_report_wording(cohort: Cohort) -> None:
    dataset, _ = cohort
    prompts = default_prompts()
    assert set(prompts) == set(FINDINGS)
    reports = " ".join(r.report for r in dataset.records)
    for label, (positives, negatives) in prompts.items():
        assert len(positives) == 6 and len(set(positives)) == 6  # generic + one per template
        for positive in positives:
            assert MENTIONS[label].search(positive) and not NEGATION.search(positive), positive
        for negative in negatives:
            assert negative in reports, label  # a normal statement the reports use
            assert not re.search(r"\b(no|not)\b", negative, re.IGNORECASE)  # not a negated finding
        # every template's own wording of the finding is among the positives
        templated = [p for p in positives[1:] if p in reports]
        assert len(templated) >= 3, (label, templated)


def test_manifest_round_trip(cohort: Cohort, tmp_path: Path) -> None:
    dataset = CxrDataset(cohort[0].records[:12], cohort[0].label_names)
    manifest = write_cxr_manifest(dataset, tmp_path)
    assert manifest == tmp_path / "manifest.csv"
    with manifest.open(newline="") as stream:
        header = next(csv.reader(stream))
    assert header == ["image", "report", "patient", "study", "site", *SYNTH_CXR_LABELS]
    loaded = read_cxr_manifest(manifest)
    assert loaded.label_names == dataset.label_names
    for original, read in zip(dataset.records, loaded.records, strict=True):
        assert (read.report, read.labels, read.patient, read.study, read.site) == (
            original.report, original.labels, original.patient, original.study, original.site,
        )  # fmt: skip
        assert isinstance(read.image, Path) and read.image.parent == tmp_path / "images"
        np.testing.assert_array_equal(np.asarray(Image.open(read.image)), _image(original))
    # Unknown labels (empty cells) come back as nan.
    text = manifest.read_text().splitlines()
    text[1] = text[1][: text[1].rindex(",")] + ","
    manifest.write_text("\n".join(text) + "\n")
    assert np.isnan(read_cxr_manifest(manifest).records[0].labels[-1])


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("Pneumothorax", "2", r"manifest\.csv:3: column 'Pneumothorax'"),
        ("Edema", "yes", r"manifest\.csv:3: column 'Edema'"),
        ("patient", "", r"manifest\.csv:3: column 'patient' is empty"),
        ("image", "images/missing.png", r"manifest\.csv:3: column 'image': file not found"),
    ],
)
def test_bad_manifest_rows_name_the_line_and_column(
    cohort: Cohort, tmp_path: Path, column: str, value: str, message: str
) -> None:
    manifest = write_cxr_manifest(CxrDataset(cohort[0].records[:3], cohort[0].label_names), tmp_path)
    with manifest.open(newline="") as stream:
        rows = list(csv.reader(stream))
    rows[2][rows[0].index(column)] = value
    with manifest.open("w", newline="") as stream:
        csv.writer(stream).writerows(rows)
    with pytest.raises(DataError, match=message):
        read_cxr_manifest(manifest)


def test_manifest_errors_for_missing_columns_and_empty_datasets(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("image,report,patient,site,Edema\na.png,x,p1,h,1\n")
    with pytest.raises(DataError, match="study"):
        read_cxr_manifest(tmp_path / "manifest.csv", check_images=False)
    (tmp_path / "manifest.csv").write_text("image,report,patient,study,site\na.png,x,p1,s1,h\n")
    with pytest.raises(DataError, match="no label columns"):
        read_cxr_manifest(tmp_path / "manifest.csv", check_images=False)
    with pytest.raises(DataError, match="not found"):
        read_cxr_manifest(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="empty"):
        write_cxr_manifest(CxrDataset([], SYNTH_CXR_LABELS), tmp_path / "out")
    bad = CxrRecord(image=np.zeros((4, 4, 3), np.uint8), report="r", labels=(1.0,), patient="p", source="s:1")
    with pytest.raises(DataError, match="s:1.*H×W uint8"):
        write_cxr_manifest(CxrDataset([bad], ("Edema",)), tmp_path / "out")
