"""A seeded generator of chest radiographs paired with radiology reports, across hospitals.

Built for demos and tests of a CLIP-style vision-language model: contrastive image↔report
training, zero-shot classification from prompts (:func:`default_prompts`), retrieval,
leave-one-hospital-out evaluation, Grad-CAM pointing / mIoU against known lesion masks, and
token↔region grounding (``finding_phrases``).

* **Findings** (:data:`SYNTH_CXR_FINDINGS`, CheXpert spellings so prompts transfer to
  MIMIC-CXR): Cardiomegaly, Consolidation, Edema, Pleural Effusion, Pneumothorax, drawn
  independently with a per-hospital prevalence; ``"No Finding"`` is 1 when none is present.
  Each has a severity (mild / moderate / severe, 40 / 40 / 20 %) that sets its size and
  strength, so a share of cases is subtle; sides and lung zones are drawn per finding
  (:mod:`fedvlm.tasks.cxr.render` draws them and says what each looks like).
* **Reports** have a FINDINGS and an IMPRESSION section in the hospital's template
  (:data:`REPORT_TEMPLATES`: headers, wording, sentence order, abbreviations such as ``R``,
  ``PTX``, British ``oedema``). Each present finding is stated with the severity, side and zone
  that were drawn; each absent one is negated with probability :data:`P_NEGATION` ("No
  pneumothorax."); a study without findings reads as normal ("The lungs are clear."). Technique,
  indication, comparison, monitoring-lead and bone sentences carry no label information.
* **Patients** have one study, or two (probability ``p_followup``) at the same hospital: the
  anatomy and any cardiomegaly persist, the other findings are drawn anew, and the follow-up
  report compares with the prior study.
* **Hospitals** ``hospital_00`` … differ in image style (:func:`~fedvlm.tasks.cxr.render.site_styles`:
  field of view, exposure, window, gamma, blur, noise, a burned-in side marker), report template
  and finding prevalence (log-normal factors of spread ``prevalence_shift``, normalised so
  that the mean over hospitals is the configured prevalence).
* **Random streams.** Patient ``i``'s anatomy, findings and reports come from
  ``default_rng([seed, i])``, each study's image from a stream of its own, so
  :func:`cxr_label_index` knows every record's labels, patient and hospital without rendering,
  and a client renders only its own rows (``generate_cxr(config, indices=rows)``).

Example:
    >>> dataset = generate_cxr(SynthCxrConfig(n=3, seed=1))
    >>> record = dataset.records[0]
    >>> record.image.shape, record.site, dataset.label_names[-1]
    ((64, 64), 'hospital_00', 'No Finding')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedvlm.data.generators import check_generator_sizes, checked_indices
from fedvlm.errors import ConfigError
from fedvlm.tasks.cxr.records import CxrDataset, CxrRecord, LesionBox
from fedvlm.tasks.cxr.render import (
    FINDINGS,
    ZONE_CENTRE_V,
    CxrAnatomy,
    CxrStyle,
    FindingSpec,
    RenderedCxr,
    render_cxr,
    sample_anatomy,
    site_styles,
)
from fedvlm.tasks.cxr.synthetic_reports import SEVERITY_PROBABILITIES, SIDE_PROBABILITIES, write_report

SYNTH_CXR_FINDINGS = FINDINGS
"""The findings the generator draws and reports, spelled as in CheXpert."""
SYNTH_CXR_LABELS = (*FINDINGS, "No Finding")
"""Label names of the generated records: the findings, then ``No Finding``."""
DEFAULT_PREVALENCE = {
    "Cardiomegaly": 0.2,
    "Consolidation": 0.15,
    "Edema": 0.12,
    "Pleural Effusion": 0.2,
    "Pneumothorax": 0.1,
}
SITE_PREVALENCE_SEED = 20250302
"""Hospital prevalence factors are a property of the hospital, not of the generator seed."""

# (low, high) of FindingSpec.extent per severity; see fedvlm.tasks.cxr.render for the meaning.
EXTENT_BY_SEVERITY = {
    "Cardiomegaly": ((0.51, 0.55), (0.55, 0.6), (0.6, 0.68)),  # cardiothoracic ratio; normal 0.4–0.5
    "Consolidation": ((0.045, 0.065), (0.065, 0.09), (0.09, 0.12)),
    "Edema": ((0.12, 0.15), (0.15, 0.19), (0.19, 0.24)),
    "Pleural Effusion": ((0.04, 0.07), (0.09, 0.15), (0.18, 0.28)),
    "Pneumothorax": ((0.1, 0.16), (0.2, 0.3), (0.35, 0.5)),
}
INTENSITY_BY_SEVERITY = ((0.55, 0.75), (0.75, 0.95), (0.95, 1.1))
ZONE_PROBABILITIES = (0.25, 0.3, 0.45)
"""P(upper), P(middle), P(lower) zone of a consolidation."""
ZONE_CENTRE_T = {"upper": (0.12, 0.24), "middle": (0.1, 0.27), "lower": (0.1, 0.27)}
"""Range of a consolidation centre's distance from the midline in each zone."""
P_LEADS = 0.25
"""P(ECG monitoring leads are drawn, and mentioned)."""
P_AP_VIEW = 0.25
RENDER_STREAM = 1
"""Last entropy word of a study's rendering stream ``default_rng([seed, patient, study, 1])``."""


@dataclass(frozen=True)
class SynthCxrConfig:
    """What to generate.

    Attributes:
        n: Number of images (studies); patients are drawn until there are ``n``.
        image_size: Image side in pixels (32 to 512); anatomy scales with it.
        num_sites: Number of hospitals; patient ``i`` goes to ``hospital_{i % num_sites:02d}``.
        prevalence: P(finding) by label; labels left out keep :data:`DEFAULT_PREVALENCE`.
        prevalence_shift: Spread (log-normal sigma) of the per-hospital prevalence factors;
            0 gives every hospital the same prevalence.
        style_shift: Strength (0 to 1) of the per-hospital image style; 0 gives every
            hospital the reference style.
        p_followup: P(a patient has a second study).
        seed: Patients depend on ``seed``; hospital style and prevalence factors do not.
    """

    n: int = 3000
    image_size: int = 64
    num_sites: int = 10
    prevalence: dict[str, float] = field(default_factory=dict)
    prevalence_shift: float = 0.5
    style_shift: float = 1.0
    p_followup: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        check_generator_sizes(self.n, self.seed, self.image_size, self.num_sites)
        unknown = sorted(set(self.prevalence) - set(FINDINGS))
        if unknown:
            raise ConfigError(f"prevalence: unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
        for label, value in self.prevalence.items():
            if not 0.0 <= value <= 0.95:
                raise ConfigError(f"prevalence[{label!r}] must be in [0, 0.95], got {value}")
        for name, high in (("prevalence_shift", 2.0), ("style_shift", 1.0), ("p_followup", 1.0)):
            if not 0.0 <= getattr(self, name) <= high:
                raise ConfigError(f"{name} must be in [0, {high}], got {getattr(self, name)}")
        object.__setattr__(self, "prevalence", {**DEFAULT_PREVALENCE, **self.prevalence})


def site_prevalences(config: SynthCxrConfig) -> np.ndarray:
    """``[num_sites, len(SYNTH_CXR_FINDINGS)]`` P(finding) at each hospital.

    Each hospital scales each prevalence by a log-normal factor of sigma ``prevalence_shift``
    drawn from :data:`SITE_PREVALENCE_SEED`; the factors of a finding are divided by their mean
    over hospitals, so equal-sized hospitals average to the configured prevalence (up to
    clipping at 0.95).
    """
    rng = np.random.default_rng(SITE_PREVALENCE_SEED)
    factors = np.exp(config.prevalence_shift * rng.standard_normal((config.num_sites, len(FINDINGS))))
    factors /= factors.mean(axis=0, keepdims=True)
    base = np.array([config.prevalence[label] for label in FINDINGS])
    return np.clip(base * factors, 0.0, 0.95)


@dataclass(frozen=True)
class CxrStudyTruth:
    """What was drawn for one study, beyond its record (for tests and analyses).

    Attributes:
        findings: The findings drawn, with severity, side, zone and extent.
        anatomy: The patient's habitus (``ctr`` is the normal ratio; cardiomegaly overrides it).
        followup: Whether this is the patient's second study.
        leads: Whether ECG monitoring leads were drawn.
    """

    findings: tuple[FindingSpec, ...]
    anatomy: CxrAnatomy
    followup: bool
    leads: bool


def _choice(rng: np.random.Generator, probabilities: tuple[float, ...]) -> int:
    """Index drawn with the given probabilities (one uniform draw, whatever the outcome)."""
    draw, cumulative = rng.random(), 0.0
    for index, probability in enumerate(probabilities[:-1]):
        cumulative += probability
        if draw < cumulative:
            return index
    return len(probabilities) - 1


def _sample_finding(rng: np.random.Generator, label: str, anatomy: CxrAnatomy) -> FindingSpec:
    severity = _choice(rng, SEVERITY_PROBABILITIES)
    extent = float(rng.uniform(*EXTENT_BY_SEVERITY[label][severity]))
    intensity = float(rng.uniform(*INTENSITY_BY_SEVERITY[severity]))
    side: str | None = "bilateral" if label == "Edema" else None
    zone, centre = None, None
    if label in SIDE_PROBABILITIES:
        side = ("right", "left", "bilateral")[_choice(rng, SIDE_PROBABILITIES[label])]
    if label == "Consolidation":
        zone = ("upper", "middle", "lower")[_choice(rng, ZONE_PROBABILITIES)]
        centre = (float(rng.uniform(*ZONE_CENTRE_T[zone])), float(rng.uniform(*ZONE_CENTRE_V[zone])))
    texture_seed = int(rng.integers(2**31))
    return FindingSpec(label, severity, extent, intensity, side, zone, centre, texture_seed)


def _jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    return (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.015, 0.015)), float(rng.uniform(-0.015, 0.015)))


def _boxes(finding_masks: dict[str, np.ndarray]) -> tuple[LesionBox, ...]:
    """A box tight around each finding's region, in :data:`FINDINGS` order."""
    boxes = []
    for label in FINDINGS:
        if label not in finding_masks or not finding_masks[label].any():
            continue
        rows = np.flatnonzero(finding_masks[label].any(axis=1))
        cols = np.flatnonzero(finding_masks[label].any(axis=0))
        width, height = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        boxes.append(LesionBox(label, float(cols[0]), float(rows[0]), float(width), float(height)))
    return tuple(boxes)


@dataclass(frozen=True)
class _DrawnStudy:
    """Everything drawn for one study before its image is rendered."""

    patient_index: int
    study_index: int
    site_index: int
    anatomy: CxrAnatomy
    findings: tuple[FindingSpec, ...]
    leads: bool
    view: str
    report: str
    phrases: tuple[tuple[str, str], ...]

    @property
    def labels(self) -> tuple[float, ...]:
        present = {spec.label for spec in self.findings}
        return (*(float(label in present) for label in FINDINGS), float(not present))


def _draw_studies(config: SynthCxrConfig) -> list[_DrawnStudy]:
    """The ``n`` studies, drawn patient by patient from ``default_rng([seed, patient])``.

    Rendering draws from each study's own stream (:func:`_render_study`), so the findings,
    reports and record count here do not depend on whether (or at what size) images are rendered.
    """
    prevalences = site_prevalences(config)
    studies: list[_DrawnStudy] = []
    patient_index = 0
    while len(studies) < config.n:
        rng = np.random.default_rng([config.seed, patient_index])
        site_index = patient_index % config.num_sites
        anatomy = sample_anatomy(rng)
        count = 2 if rng.random() < config.p_followup else 1
        persistent: tuple[FindingSpec, ...] = ()
        for study_index in range(min(count, config.n - len(studies))):  # the n-th study ends the last patient
            findings = list(persistent)
            for label, probability in zip(FINDINGS, prevalences[site_index], strict=True):
                drawn = _sample_finding(rng, label, anatomy)  # drawn either way: a fixed stream
                if rng.random() < probability and not (label == "Cardiomegaly" and study_index > 0):
                    findings.append(drawn)
            persistent = tuple(spec for spec in findings if spec.label == "Cardiomegaly")
            leads = bool(rng.random() < P_LEADS)
            view = "AP" if rng.random() < P_AP_VIEW else "PA"
            report, phrases = write_report(rng, tuple(findings), site_index, view, study_index > 0, leads)
            studies.append(
                _DrawnStudy(
                    patient_index, study_index, site_index, anatomy, tuple(findings), leads, view, report, phrases
                )
            )
        patient_index += 1
    return studies


def _render_study(config: SynthCxrConfig, study: _DrawnStudy, style: CxrStyle) -> RenderedCxr:
    """Render a study from its own stream ``default_rng([seed, patient, study, RENDER_STREAM])``.

    The stream draws the positioning jitter and the electrode positions (whether or not leads
    are drawn, so the noise does not depend on them), then the image's markings and noise.
    """
    rng = np.random.default_rng([config.seed, study.patient_index, study.study_index, RENDER_STREAM])
    jitter = _jitter(rng)
    lead_points = tuple((float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.15, 0.35))) for _ in range(3))
    return render_cxr(
        rng, config.image_size, study.anatomy, study.findings, style, jitter, lead_points if study.leads else ()
    )


def generate_cxr_with_truth(
    config: SynthCxrConfig, indices: Sequence[int] | None = None
) -> tuple[CxrDataset, list[CxrStudyTruth]]:
    """Generate a dataset and what was drawn for each study.

    Patient ``i`` is drawn from its own stream ``default_rng([seed, i])``, so the first records
    do not depend on ``n`` (except that the last patient loses its follow-up when ``n`` is
    reached), and the same patients are drawn at every ``image_size``. Each study's image is
    rendered from a stream of its own, so a client can render only its own records
    (``indices``); findings and reports of every record are still drawn, which is cheap.

    Args:
        config: What to generate.
        indices: Records to generate (positions in the full generation), in this order
            (repeats allowed); all ``n`` when ``None``. Each record equals the record at that
            position of the full generation, ``source`` included.

    Returns:
        The dataset (``label_names`` = :data:`SYNTH_CXR_LABELS`) and one truth per record.

    Raises:
        IndexError: If an index is outside ``0 .. n-1``.
    """
    chosen = checked_indices(indices, config.n, "record")
    styles = site_styles(config.num_sites, config.style_shift)
    studies = _draw_studies(config)
    records: list[CxrRecord] = []
    truths: list[CxrStudyTruth] = []
    for record_index in chosen:
        study = studies[record_index]
        rendered = _render_study(config, study, styles[study.site_index])
        patient = f"cxr{study.patient_index:05d}"
        records.append(
            CxrRecord(
                image=rendered.image,
                report=study.report,
                labels=study.labels,
                patient=patient,
                study=f"{patient}_s{study.study_index}",
                site=_hospital_name(study.site_index),
                view=study.view,
                source=f"synthetic_cxr:{record_index}",
                boxes=_boxes(rendered.finding_masks),
                lesion_mask=rendered.lesion_mask,
                finding_phrases=study.phrases,
            )
        )
        truths.append(CxrStudyTruth(study.findings, study.anatomy, study.study_index > 0, study.leads))
    return CxrDataset(records, SYNTH_CXR_LABELS), truths


def generate_cxr(config: SynthCxrConfig, indices: Sequence[int] | None = None) -> CxrDataset:
    """Generate synthetic chest radiographs with reports (see the module docstring).

    Args:
        config: What to generate.
        indices: Records to generate, in this order; all ``n`` when ``None`` (see
            :func:`generate_cxr_with_truth`).

    Returns:
        The dataset, records in patient order (a patient's studies adjacent; in the order of
        ``indices`` when given), ``split=None``.
    """
    return generate_cxr_with_truth(config, indices)[0]


@dataclass(frozen=True, eq=False)
class CxrLabelIndex:
    """Labels, patients and hospitals of every generated record, known without rendering images.

    A federated client uses it to compute the seeded partition, then generates only its own rows
    with ``generate_cxr(config, indices=rows)``. Row ``i`` describes record ``i``.

    Attributes:
        labels: ``float32 [n, len(SYNTH_CXR_LABELS)]`` 0/1 labels in :data:`SYNTH_CXR_LABELS` order.
        patient: ``[n]`` patient ids (``"cxr00000"``, ...), a numpy string array.
        site: ``[n]`` hospital names (``"hospital_00"``, ...), an object array (as the loaders give).
    """

    labels: np.ndarray
    patient: np.ndarray
    site: np.ndarray


def cxr_label_index(config: SynthCxrConfig) -> CxrLabelIndex:
    """The labels, patients and hospitals of ``generate_cxr(config)``, without rendering.

    Args:
        config: What would be generated.

    Returns:
        One row per record of the full generation.

    Example:
        >>> index = cxr_label_index(SynthCxrConfig(n=4, num_sites=2, seed=1))
        >>> index.labels.shape, index.site.tolist()[:1]
        ((4, 6), ['hospital_00'])
    """
    studies = _draw_studies(config)
    labels = np.zeros((len(studies), len(SYNTH_CXR_LABELS)), dtype=np.float32)
    for row, study in enumerate(studies):
        labels[row] = study.labels
    return CxrLabelIndex(
        labels=labels,
        patient=np.array([f"cxr{study.patient_index:05d}" for study in studies], dtype=str),
        site=np.array([_hospital_name(study.site_index) for study in studies], dtype=object),
    )


def _hospital_name(site_index: int) -> str:
    return f"hospital_{site_index:02d}"
