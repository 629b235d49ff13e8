"""A seeded generator of multimodal leukemia cases: smear-like images paired with clinical notes.

The cases are calibrated so that **neither modality alone suffices** and fusion is needed:

* **Latent truth.** Leukemia ``y ~ Bernoulli(positive_fraction)``; positives get a stage I–IV
  uniformly; the true peripheral blast percentage is 0–3 for negatives and 5–19, 20–39, 40–59,
  60–90 for stages I–IV (:data:`BLAST_PERCENT_BY_STAGE`).
* **Image.** An *informative* image shows blasts (large cells, high nucleus/cytoplasm ratio,
  pale fine chromatin, nucleoli, Auer rods in ≈30 % of positive patients) in a number that
  reflects the stage (:data:`BLAST_COUNT_BY_STAGE`: I 1–2, II 3–5, III 5–7, IV 8–11; none for
  negatives). It decides the label, and the stage except between II and III. With probability
  ``p_ambiguous_image`` the image is *uninformative*: it shows 0–2 equivocal atypical lymphoid
  cells drawn identically for both labels (small lymphocyte-like blasts of a positive, reactive
  lymphocytes of a negative), so the image says nothing about the label beyond "ambiguous".
* **Report.** An *informative* report states the blast percentage ("Peripheral blasts 45%"),
  which decides the label and the stage exactly; negatives with 0 % read "no blasts seen".
  A share :data:`P_IMPRESSION` of informative reports also closes with the clinician's
  impression ("Impression: acute leukemia, stage III." / "no evidence of leukemia.").
  With probability ``p_report_omits_values`` the report omits it (and all diagnostic wording),
  keeping only weak evidence: symptoms (present or negated, somewhat more frequent in positives)
  and CBC values (higher WBC, lower Hb and platelets in positives, worse with stage, overlapping
  heavily with infection and anaemia in negatives). Demographics are pure noise.
* Image and report ambiguity are drawn **independently**, so a fraction
  ``p_ambiguous_image × p_report_omits_values`` of cases is hard for any model, and a model that
  uses both modalities is right wherever either one is informative.

With the defaults, the Bayes-optimal accuracy on the leukemia label is about 0.89 from the image
alone (0.75 decided + 0.25 at the prior 0.55), about 0.88 from the report alone (0.65 decided +
0.35 at ≈0.67, i.e. AUROC ≈0.73 from symptoms and CBC), and about 0.97 from both. For the stage
(positives): ≈0.76 image-only (II/III tie at 5 blasts), ≈0.77 report-only, ≈0.92 fused.

Sites differ by feature shift: stain colours, magnification, blur and noise of the images
(:mod:`fedvlm.tasks.leukemia.smear_render`), and the wording and order of the report template.

Patient ``i`` has its own random stream, so a federated client can learn every record's label,
patient and site without rendering (:func:`leukemia_label_index`), partition them, and then
generate only its own patients (``generate_leukemia(config, indices=rows)``).

Example:
    >>> records = generate_leukemia(SynthLeukemiaConfig(n=2, seed=3))
    >>> records[0].image.shape, records[0].patient, records[1].site
    ((64, 64, 3), 'synth00000', 'site01')
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedvlm.data.generators import check_generator_sizes, checked_indices, report_tokens
from fedvlm.errors import ConfigError
from fedvlm.tasks.leukemia.records import LeukemiaRecord
from fedvlm.tasks.leukemia.smear_render import SmearContents, render_smear, site_styles

NEGATIVE_BLAST_PERCENT = (0, 3)
BLAST_PERCENT_BY_STAGE = ((5, 19), (20, 39), (40, 59), (60, 90))
"""Inclusive blast % range of each stage (0-based index); the report's value maps to it exactly."""
BLAST_COUNT_BY_STAGE = ((1, 2), (3, 5), (5, 7), (8, 11))
"""Inclusive number of blasts in an informative image of each stage; II and III overlap at 5."""
AMBIGUOUS_ATYPICAL_CELLS = (0, 2)
"""Inclusive number of equivocal cells in an uninformative image, whatever the label."""
AUER_ROD_PATIENT_FRACTION = 0.3

SYMPTOMS = ("fatigue", "pallor", "fever", "bruising", "bone pain", "night sweats")
SYMPTOM_MENTION_PROBABILITY = 0.65
SYMPTOM_PRESENT_NEGATIVE = 0.33
"""P(a mentioned symptom is present) for a negative (referred for infection, anaemia, ...)."""
SYMPTOM_PRESENT_POSITIVE_BY_STAGE = (0.37, 0.40, 0.43, 0.46)

# CBC: WBC and platelets log-normal (median, log sd), Hb normal (mean, sd); x10^9/L and g/dL.
WBC_NEGATIVE = (7.5, 0.5)
WBC_POSITIVE_BY_STAGE = ((8.0, 0.6), (8.8, 0.65), (9.6, 0.7), (10.5, 0.75))
HB_NEGATIVE = (12.6, 2.0)
HB_POSITIVE_BY_STAGE = ((12.2, 2.0), (11.8, 2.0), (11.4, 2.0), (11.0, 2.0))
PLATELETS_NEGATIVE = (240.0, 0.45)
PLATELETS_POSITIVE_BY_STAGE = ((225.0, 0.5), (205.0, 0.5), (185.0, 0.55), (165.0, 0.55))

OCCUPATIONS = (
    "teacher", "farmer", "nurse", "bus driver", "software engineer", "cook", "retired clerk",
    "student", "electrician", "accountant", "shop assistant", "mechanic", "painter", "librarian",
    "carpenter",
)  # fmt: skip
AGE_RANGE = (18, 88)
LARGEST_NUMBER = 999
"""Every number in a report is at most this, so ``report_vocabulary`` can list them all."""


@dataclass(frozen=True)
class SynthLeukemiaConfig:
    """What to generate.

    Attributes:
        n: Number of patients (one record each).
        image_size: Image side in pixels (64 to 224); cells scale with it.
        num_sites: Number of sites ``site00``, ``site01``, ...; patient ``i`` is at site
            ``i % num_sites``.
        positive_fraction: P(leukemia).
        p_ambiguous_image: P(the image is uninformative).
        p_report_omits_values: P(the report omits the blast value), independent of the image.
        seed: Patients depend on ``seed``; site appearance does not (a site always looks alike).
    """

    n: int = 5400
    image_size: int = 64
    num_sites: int = 10
    positive_fraction: float = 0.55
    p_ambiguous_image: float = 0.25
    p_report_omits_values: float = 0.35
    seed: int = 0

    def __post_init__(self) -> None:
        check_generator_sizes(self.n, self.seed, self.image_size, self.num_sites)
        for name in ("positive_fraction", "p_ambiguous_image", "p_report_omits_values"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class ReportTemplate:
    """One site's way of writing the same content.

    Attributes:
        sections: Order of ``"demographics"``, ``"symptoms"``, ``"cbc"``, ``"blasts"``.
        demographics: Format with ``{age}``, ``{sex}``, ``{occupation}``.
        sex_words: Words for (female, male).
        symptoms_present: Format with ``{symptoms}`` (the present ones, joined).
        cbc: Format with ``{wbc}``, ``{hb}``, ``{platelets}``.
        blasts: Format with ``{percent}`` (e.g. ``"45%"``); its first ``blast*`` word and the
            number are the signal words.
        no_blasts: Sentence for a negative with 0 % blasts.
    """

    sections: tuple[str, ...]
    demographics: str
    sex_words: tuple[str, str]
    symptoms_present: str
    cbc: str
    blasts: str
    no_blasts: str


REPORT_TEMPLATES = (
    ReportTemplate(
        sections=("demographics", "symptoms", "cbc", "blasts"),
        demographics="{age}-year-old {sex} {occupation}.",
        sex_words=("female", "male"),
        symptoms_present="Presenting complaints: {symptoms}.",
        cbc="CBC: WBC {wbc}, Hb {hb}, PLT {platelets}.",
        blasts="Peripheral blasts {percent}.",
        no_blasts="No blasts seen.",
    ),
    ReportTemplate(
        sections=("demographics", "symptoms", "blasts", "cbc"),
        demographics="Patient: {age} year old {occupation} ({sex}).",
        sex_words=("woman", "man"),
        symptoms_present="Reports {symptoms}.",
        cbc="White count {wbc} x10^9/L, haemoglobin {hb} g/dL, platelets {platelets} x10^9/L.",
        blasts="Blast count {percent} on smear.",
        no_blasts="No blasts seen on smear.",
    ),
    ReportTemplate(
        sections=("cbc", "blasts", "demographics", "symptoms"),
        demographics="History: {sex} aged {age}, occupation {occupation}.",
        sex_words=("female", "male"),
        symptoms_present="Complains of {symptoms}.",
        cbc="Hematology referral. CBC shows WBC {wbc} x10^9/L, Hb {hb} g/dL and platelets {platelets} x10^9/L.",
        blasts="Smear review: {percent} blasts.",
        no_blasts="Smear review: no blasts seen.",
    ),
    ReportTemplate(
        sections=("cbc", "blasts", "symptoms", "demographics"),
        demographics="Demographics: {age} y, {sex}, {occupation}.",
        sex_words=("F", "M"),
        symptoms_present="Symptoms: {symptoms}.",
        cbc="Labs: platelets {platelets}, hemoglobin {hb}, leukocytes {wbc}.",
        blasts="Differential: blasts {percent}.",
        no_blasts="Differential: no blasts seen.",
    ),
    ReportTemplate(
        sections=("demographics", "cbc", "blasts", "symptoms"),
        demographics="Summary for {sex} patient, age {age}, {occupation}.",
        sex_words=("female", "male"),
        symptoms_present="Clinical features: {symptoms}.",
        cbc="Blood count: leukocytes {wbc} x10^9/L; Hb {hb} g/dL; PLT {platelets} x10^9/L.",
        blasts="Manual differential with {percent} blasts.",
        no_blasts="Manual differential: no blasts seen.",
    ),
)
"""Site ``k`` writes with template ``k % 5``; sites 5–9 write ``"45 %"``, sites 0–4 ``"45%"``."""

_CONNECTING_WORDS = ("Denies", "No", "and", "or", "Symptom review unremarkable.")

P_IMPRESSION = 0.8
"""Share of informative reports that also state the clinician's impression (stage wording)."""
IMPRESSION_POSITIVE = "Impression: acute leukemia, stage {stage}."
IMPRESSION_NEGATIVE = "Impression: no evidence of leukemia."
STAGE_WORDS = ("I", "II", "III", "IV")


def report_vocabulary() -> list[str]:
    """Every token the report templates can produce, sorted, for building a tokenizer.

    Returns:
        Lower-cased word and punctuation tokens, including every number ``0..999``.
    """
    literals: list[str] = [*SYMPTOMS, *OCCUPATIONS, *_CONNECTING_WORDS, *STAGE_WORDS]
    literals.extend([IMPRESSION_NEGATIVE, *(lit for lit, *_ in string.Formatter().parse(IMPRESSION_POSITIVE))])
    for template in REPORT_TEMPLATES:
        literals.extend(template.sex_words)
        texts = (template.demographics, template.symptoms_present, template.cbc, template.blasts, template.no_blasts)
        for text in texts:
            literals.extend(literal for literal, *_ in string.Formatter().parse(text))
    vocabulary = {token for literal in literals for token in report_tokens(literal)}
    # Tokens that come from formatted values, not from template text.
    vocabulary.update(str(number) for number in range(LARGEST_NUMBER + 1))
    vocabulary.update({"%", ".", ","})
    return sorted(vocabulary)


@dataclass(frozen=True)
class _Patient:
    """Latent truth of one patient, drawn before anything is rendered."""

    leukemia: int
    stage: int | None
    blast_percent: int
    informative_image: bool
    informative_report: bool
    auer_rods: bool


def blast_count_by_stage(stage: int, blast_percent: int) -> int:
    """Blasts drawn in an informative image: more within the stage's range for a higher %.

    Example:
        >>> [blast_count_by_stage(1, percent) for percent in (20, 26, 27, 33, 34, 39)]
        [3, 3, 4, 4, 5, 5]
    """
    low_percent, high_percent = BLAST_PERCENT_BY_STAGE[stage]
    low_count, high_count = BLAST_COUNT_BY_STAGE[stage]
    position = (blast_percent - low_percent) / (high_percent - low_percent + 1)
    return low_count + int(position * (high_count - low_count + 1))


def _sample_patient(rng: np.random.Generator, config: SynthLeukemiaConfig) -> _Patient:
    leukemia = int(rng.random() < config.positive_fraction)
    stage = int(rng.integers(len(BLAST_PERCENT_BY_STAGE))) if leukemia else None
    low, high = BLAST_PERCENT_BY_STAGE[stage] if stage is not None else NEGATIVE_BLAST_PERCENT
    return _Patient(
        leukemia=leukemia,
        stage=stage,
        blast_percent=int(rng.integers(low, high + 1)),
        informative_image=bool(rng.random() >= config.p_ambiguous_image),
        informative_report=bool(rng.random() >= config.p_report_omits_values),
        auer_rods=bool(leukemia and rng.random() < AUER_ROD_PATIENT_FRACTION),
    )


def _smear_contents(rng: np.random.Generator, patient: _Patient) -> SmearContents:
    if not patient.informative_image:
        low, high = AMBIGUOUS_ATYPICAL_CELLS
        return SmearContents(atypical_cells=int(rng.integers(low, high + 1)))
    if patient.stage is None:
        return SmearContents()
    blasts = blast_count_by_stage(patient.stage, patient.blast_percent)
    return SmearContents(blasts=blasts, auer_rods=patient.auer_rods)


def _join(words: list[str], conjunction: str = "and") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def _symptom_sentences(rng: np.random.Generator, patient: _Patient, template: ReportTemplate) -> str:
    """Present symptoms in the template's wording, then negated ones ("Denies x. No y.")."""
    stage = patient.stage
    p_present = SYMPTOM_PRESENT_NEGATIVE if stage is None else SYMPTOM_PRESENT_POSITIVE_BY_STAGE[stage]
    present: list[str] = []
    denied: list[str] = []
    absent: list[str] = []
    for symptom in SYMPTOMS:
        if rng.random() >= SYMPTOM_MENTION_PROBABILITY:
            continue
        if rng.random() < p_present:
            present.append(symptom)
        else:
            (denied if rng.random() < 0.5 else absent).append(symptom)
    sentences = []
    if present:
        sentences.append(template.symptoms_present.format(symptoms=_join(present)))
    if denied:
        sentences.append(f"Denies {_join(denied)}.")
    if absent:
        sentences.append(f"No {_join(absent, 'or')}.")
    return " ".join(sentences) or "Symptom review unremarkable."


def _cbc_values(rng: np.random.Generator, patient: _Patient) -> tuple[float, float, int]:
    stage = patient.stage
    wbc_median, wbc_sd = WBC_NEGATIVE if stage is None else WBC_POSITIVE_BY_STAGE[stage]
    hb_mean, hb_sd = HB_NEGATIVE if stage is None else HB_POSITIVE_BY_STAGE[stage]
    plt_median, plt_sd = PLATELETS_NEGATIVE if stage is None else PLATELETS_POSITIVE_BY_STAGE[stage]
    wbc = float(np.clip(wbc_median * np.exp(wbc_sd * rng.standard_normal()), 0.5, 250.0))
    hb = float(np.clip(rng.normal(hb_mean, hb_sd), 4.5, 18.5))
    platelets = int(np.clip(plt_median * np.exp(plt_sd * rng.standard_normal()), 5, 900))
    return wbc, hb, platelets


def _write_report(rng: np.random.Generator, patient: _Patient, site_index: int) -> tuple[str, tuple[str, ...]]:
    """The clinical narrative of a patient in its site's template, and its signal words.

    Returns:
        The report and the tokens of its decisive phrase (empty when the value is omitted).
    """
    template = REPORT_TEMPLATES[site_index % len(REPORT_TEMPLATES)]
    spaced_percent = (site_index // len(REPORT_TEMPLATES)) % 2 == 1
    sex = template.sex_words[int(rng.integers(2))]
    age = int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1))
    occupation = OCCUPATIONS[int(rng.integers(len(OCCUPATIONS)))]
    wbc, hb, platelets = _cbc_values(rng, patient)
    sections = {
        "demographics": template.demographics.format(age=age, sex=sex, occupation=occupation),
        "symptoms": _symptom_sentences(rng, patient, template),
        "cbc": template.cbc.format(wbc=f"{wbc:.1f}", hb=f"{hb:.1f}", platelets=platelets),
    }
    signal_words: tuple[str, ...] = ()
    if patient.informative_report:
        if patient.blast_percent == 0:
            sections["blasts"] = template.no_blasts
            signal_words = ("no", "blasts", "seen")
        else:
            percent = f"{patient.blast_percent}{' %' if spaced_percent else '%'}"
            sections["blasts"] = template.blasts.format(percent=percent)
            blast_word = next(t for t in report_tokens(template.blasts) if t.startswith("blast"))
            signal_words = (blast_word, str(patient.blast_percent))
    impression = ""
    if patient.informative_report and rng.random() < P_IMPRESSION:
        if patient.stage is None:
            impression = IMPRESSION_NEGATIVE
        else:
            stage_word = STAGE_WORDS[patient.stage]
            impression = IMPRESSION_POSITIVE.format(stage=stage_word)
            signal_words = (*signal_words, "stage", stage_word.lower())
    report = " ".join(sections[name] for name in template.sections if name in sections)
    return f"{report} {impression}".strip(), signal_words


def generate_leukemia_with_truth(
    config: SynthLeukemiaConfig,
    indices: Sequence[int] | None = None,
) -> tuple[list[LeukemiaRecord], np.ndarray, np.ndarray]:
    """Generate records and say which of their images and reports were informative.

    Patient ``i`` is drawn from its own stream ``default_rng([seed, i])``, so the first ``k``
    records do not depend on ``n``, the same patients are drawn at every ``image_size``, and a
    client can generate only its own patients (``indices``).

    Args:
        config: What to generate.
        indices: Patients to generate, in this order (repeats allowed); all ``n`` when ``None``.
            Each record equals record ``i`` of the full generation.

    Returns:
        The records, a boolean array ``informative_image`` and one ``informative_report``,
        each of length ``len(indices)`` (``n`` when ``None``).

    Raises:
        IndexError: If an index is outside ``0 .. n-1``.
    """
    chosen = checked_indices(indices, config.n, "patient")
    styles = site_styles(config.num_sites)
    records = []
    informative_image = np.zeros(len(chosen), dtype=bool)
    informative_report = np.zeros(len(chosen), dtype=bool)
    for position, index in enumerate(chosen):
        rng = np.random.default_rng([config.seed, index])
        site_index = index % config.num_sites
        patient = _sample_patient(rng, config)
        report, signal_words = _write_report(rng, patient, site_index)
        contents = _smear_contents(rng, patient)
        smear = render_smear(rng, config.image_size, styles[site_index], contents)
        # Atypical cells of a positive are its (lymphocyte-like) blasts; of a negative, reactive.
        blast_points = smear.blast_centres + (smear.atypical_centres if patient.leukemia else ())
        records.append(
            LeukemiaRecord(
                image=smear.image,
                report=report,
                leukemia=patient.leukemia,
                stage=patient.stage,
                patient=_patient_name(index),
                site=_site_name(site_index),
                source=f"synthetic:{index}",
                blast_points=blast_points,
                signal_words=signal_words,
            )
        )
        informative_image[position] = patient.informative_image
        informative_report[position] = patient.informative_report
    return records, informative_image, informative_report


def generate_leukemia(config: SynthLeukemiaConfig, indices: Sequence[int] | None = None) -> list[LeukemiaRecord]:
    """Generate synthetic leukemia records (see the module docstring).

    Args:
        config: What to generate.
        indices: Patients to generate, in this order; all ``n`` when ``None`` (see
            :func:`generate_leukemia_with_truth`).

    Returns:
        The records, in patient order (in the order of ``indices`` when given).
    """
    return generate_leukemia_with_truth(config, indices)[0]


@dataclass(frozen=True, eq=False)
class LeukemiaLabelIndex:
    """Labels, patients and sites of every generated record, known without rendering images.

    A federated client uses it to compute the seeded partition, then generates only its own rows
    with ``generate_leukemia(config, indices=rows)``. Row ``i`` describes record ``i``.

    Attributes:
        leukemia: ``int64 [n]``, 1 for leukemia, 0 for a healthy control.
        stage: ``int64 [n]``, the 0-based stage of a positive, -1 for a negative.
        patient: ``[n]`` patient ids (``"synth00000"``, ...), a numpy string array.
        site: ``[n]`` site names (``"site00"``, ...), an object array (as the loaders give).
    """

    leukemia: np.ndarray
    stage: np.ndarray
    patient: np.ndarray
    site: np.ndarray


@lru_cache(maxsize=2)
def leukemia_label_index(config: SynthLeukemiaConfig) -> LeukemiaLabelIndex:
    """The labels, patients and sites of ``generate_leukemia(config)``, without rendering.

    The label of patient ``i`` is the first draw from its stream (before the report and the
    image), and its patient id and site follow from ``i``, so this costs a few draws per patient.
    Cached per process: a simulation worker that prepares many clients of one generator draws the
    index once, not once per client (with 1,000 clients, the difference between O(n) and O(n²)).
    The arrays are shared: read them, never write.

    Args:
        config: What would be generated.

    Returns:
        One row per record of the full generation.

    Example:
        >>> index = leukemia_label_index(SynthLeukemiaConfig(n=3, num_sites=2, seed=3))
        >>> index.patient.tolist(), index.site.tolist()
        (['synth00000', 'synth00001', 'synth00002'], ['site00', 'site01', 'site00'])
    """
    patients = [_sample_patient(np.random.default_rng([config.seed, index]), config) for index in range(config.n)]
    return LeukemiaLabelIndex(
        leukemia=np.array([patient.leukemia for patient in patients], dtype=np.int64),
        stage=np.array([-1 if patient.stage is None else patient.stage for patient in patients], dtype=np.int64),
        patient=np.array([_patient_name(index) for index in range(config.n)], dtype=str),
        site=np.array([_site_name(index % config.num_sites) for index in range(config.n)], dtype=object),
    )


def _patient_name(index: int) -> str:
    return f"synth{index:05d}"


def _site_name(site_index: int) -> str:
    return f"site{site_index:02d}"
