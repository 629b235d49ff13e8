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
  (:mod:`fedvlm.data.cxr_render` draws them and says what each looks like).
* **Reports** have a FINDINGS and an IMPRESSION section in the hospital's template
  (:data:`REPORT_TEMPLATES`: headers, wording, sentence order, abbreviations such as ``R``,
  ``PTX``, British ``oedema``). Each present finding is stated with the severity, side and zone
  that were drawn; each absent one is negated with probability :data:`P_NEGATION` ("No
  pneumothorax."); a study without findings reads as normal ("The lungs are clear."). Technique,
  indication, comparison, monitoring-lead and bone sentences carry no label information.
* **Patients** have one study, or two (probability ``p_followup``) at the same hospital: the
  anatomy and any cardiomegaly persist, the other findings are drawn anew, and the follow-up
  report compares with the prior study.
* **Hospitals** ``hospital_00`` … differ in image style (:func:`~fedvlm.data.cxr_render.site_styles`:
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

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fedvlm.data.cxr_records import CxrDataset, CxrRecord, LesionBox
from fedvlm.data.cxr_render import (
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
from fedvlm.data.images import atomic_destination
from fedvlm.data.manifest import read_table
from fedvlm.data.synthetic_leukemia import checked_indices, report_tokens
from fedvlm.errors import ConfigError, DataError

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

SEVERITY_PROBABILITIES = (0.4, 0.4, 0.2)
"""P(mild), P(moderate), P(severe) of a present finding."""
# (low, high) of FindingSpec.extent per severity; see fedvlm.data.cxr_render for the meaning.
EXTENT_BY_SEVERITY = {
    "Cardiomegaly": ((0.51, 0.55), (0.55, 0.6), (0.6, 0.68)),  # cardiothoracic ratio; normal 0.4–0.5
    "Consolidation": ((0.045, 0.065), (0.065, 0.09), (0.09, 0.12)),
    "Edema": ((0.12, 0.15), (0.15, 0.19), (0.19, 0.24)),
    "Pleural Effusion": ((0.04, 0.07), (0.09, 0.15), (0.18, 0.28)),
    "Pneumothorax": ((0.1, 0.16), (0.2, 0.3), (0.35, 0.5)),
}
INTENSITY_BY_SEVERITY = ((0.55, 0.75), (0.75, 0.95), (0.95, 1.1))
SIDE_PROBABILITIES = {
    "Pleural Effusion": (0.4, 0.3, 0.3),
    "Consolidation": (0.5, 0.5, 0.0),
    "Pneumothorax": (0.5, 0.5, 0.0),
}
"""P(right), P(left), P(bilateral) of a lateralised finding; edema is always bilateral."""
ZONE_PROBABILITIES = (0.25, 0.3, 0.45)
"""P(upper), P(middle), P(lower) zone of a consolidation."""
ZONE_CENTRE_T = {"upper": (0.12, 0.24), "middle": (0.1, 0.27), "lower": (0.1, 0.27)}
"""Range of a consolidation centre's distance from the midline in each zone."""
SEVERITY_WORDS = {
    "Cardiomegaly": ("mild", "moderate", "marked"),
    "Consolidation": ("patchy", "confluent", "dense"),
    "Edema": ("mild", "moderate", "severe"),
    "Pleural Effusion": ("small", "moderate", "large"),
    "Pneumothorax": ("small", "moderate", "large"),
}
SEVERITY_ADVERBS = ("mildly", "moderately", "markedly")
P_NEGATION = 0.7
"""P(an absent finding is explicitly negated in the report)."""
P_LEADS = 0.25
"""P(ECG monitoring leads are drawn, and mentioned)."""
P_AP_VIEW = 0.25
INDICATIONS = ("Cough.", "Shortness of breath.", "Fever.", "Chest pain.", "Preoperative evaluation.", "Follow-up.")
BONE_SENTENCES = (
    "No acute osseous abnormality.",
    "Mild degenerative changes of the thoracic spine.",
    "The visualized osseous structures are unremarkable.",
)
INDICATION_HEADER = "INDICATION:"
TECHNIQUE_SENTENCES = {"AP": "Portable AP view of the chest.", "PA": "PA and lateral views of the chest."}
COMPARISON_SENTENCES = {True: "Comparison is made to the prior study.", False: "Comparison: None."}
"""The comparison sentence of a follow-up (``True``) and of a first study."""
LEADS_SENTENCE = "ECG monitoring leads overlie the chest."
HEART_FAILURE_SENTENCE = "Findings are consistent with congestive heart failure."
NO_FINDING_PROMPTS = (("No acute abnormality.",), ("There is an abnormality.",))
"""Zero-shot prompts of ``No Finding``: ``(positive phrasings, negative phrasings)``."""
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
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not 32 <= self.image_size <= 512:
            raise ConfigError(f"image_size must be in 32..512, got {self.image_size}")
        if not 1 <= self.num_sites <= 100:
            raise ConfigError(f"num_sites must be in 1..100, got {self.num_sites}")
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


@dataclass(frozen=True)
class CxrReportTemplate:
    """One hospital's way of writing a chest radiograph report.

    Sentence formats mark the finding phrase (what ``finding_phrases`` records) with ``[...]``
    and are formatted with ``severity`` (``Severity`` capitalised), ``adverb``, ``side`` and
    ``zone``; a key ``"<label>/bilateral"`` is used for bilateral findings when present.

    Attributes:
        findings_header: Header of the findings section.
        impression_header: Header of the impression section.
        preamble: Order of the ``"indication"``, ``"technique"``, ``"comparison"`` sentences.
        order: Order in which findings (present or negated) are discussed.
        positive: Sentence stating a present finding, by label.
        negative: Sentence negating an absent finding, by label.
        joint_negative: Sentence negating both pleural effusion and pneumothorax.
        lungs_clear: Sentence for lungs without any finding.
        normal_impression: Impression of a study without findings.
        side_words: Words for ``right``, ``left``, ``bilateral``.
        zone_words: Words for the ``upper``, ``middle``, ``lower`` zones.
    """

    findings_header: str
    impression_header: str
    preamble: tuple[str, ...]
    order: tuple[str, ...]
    positive: dict[str, str]
    negative: dict[str, str]
    joint_negative: str
    lungs_clear: str
    normal_impression: str
    side_words: tuple[str, str, str] = ("right", "left", "bilateral")
    zone_words: tuple[str, str, str] = ("upper", "mid", "lower")


_LUNGS_FIRST = ("Consolidation", "Edema", "Pleural Effusion", "Pneumothorax", "Cardiomegaly")
_HEART_FIRST = ("Cardiomegaly", "Edema", "Consolidation", "Pleural Effusion", "Pneumothorax")
REPORT_TEMPLATES = (
    CxrReportTemplate(
        findings_header="FINDINGS:",
        impression_header="IMPRESSION:",
        preamble=("indication", "technique", "comparison"),
        order=_LUNGS_FIRST,
        positive={
            "Cardiomegaly": "There is [{severity} cardiomegaly].",
            "Consolidation": "There is [{severity} consolidation in the {side} {zone} lung].",
            "Edema": "There is [{severity} pulmonary edema].",
            "Pleural Effusion": "There is a [{severity} {side} pleural effusion].",
            "Pleural Effusion/bilateral": "There are [{severity} bilateral pleural effusions].",
            "Pneumothorax": "There is a [{severity} {side} pneumothorax].",
        },
        negative={
            "Cardiomegaly": "The heart size is normal.",
            "Consolidation": "No focal consolidation.",
            "Edema": "No pulmonary edema.",
            "Pleural Effusion": "No pleural effusion.",
            "Pneumothorax": "No pneumothorax.",
        },
        joint_negative="No pleural effusion or pneumothorax.",
        lungs_clear="The lungs are clear.",
        normal_impression="No acute cardiopulmonary process.",
    ),
    CxrReportTemplate(
        findings_header="Findings:",
        impression_header="Impression:",
        preamble=("technique", "comparison"),
        order=_HEART_FIRST,
        positive={
            "Cardiomegaly": "[The cardiac silhouette is {adverb} enlarged].",
            "Consolidation": "[{Severity} airspace consolidation in the {side} {zone} zone] is noted.",
            "Edema": "[{Severity} interstitial pulmonary edema] is present.",
            "Pleural Effusion": "[{Severity} {side} pleural effusion] is present.",
            "Pleural Effusion/bilateral": "[{Severity} bilateral pleural effusions] are present.",
            "Pneumothorax": "[{Severity} {side} pneumothorax] is seen.",
        },
        negative={
            "Cardiomegaly": "Cardiac silhouette is within normal limits.",
            "Consolidation": "There is no focal airspace consolidation.",
            "Edema": "No evidence of pulmonary edema.",
            "Pleural Effusion": "There is no pleural effusion.",
            "Pneumothorax": "There is no pneumothorax.",
        },
        joint_negative="There is no pleural effusion or pneumothorax.",
        lungs_clear="The lungs are well expanded and clear.",
        normal_impression="No acute cardiopulmonary abnormality.",
        zone_words=("upper", "middle", "lower"),
    ),
    CxrReportTemplate(
        findings_header="FINDINGS",
        impression_header="CONCLUSION",
        preamble=("comparison",),
        order=_LUNGS_FIRST,
        positive={
            "Cardiomegaly": "[{Severity} cardiomegaly].",
            "Consolidation": "[{Severity} {side} {zone} zone consolidation].",
            "Edema": "[{Severity} pulmonary edema].",
            "Pleural Effusion": "[{Severity} {side} pleural effusion].",
            "Pleural Effusion/bilateral": "[{Severity} bilateral pleural effusions].",
            "Pneumothorax": "[{Severity} {side} pneumothorax].",
        },
        negative={
            "Cardiomegaly": "Normal heart size.",
            "Consolidation": "No consolidation.",
            "Edema": "No edema.",
            "Pleural Effusion": "No effusion.",
            "Pneumothorax": "No pneumothorax.",
        },
        joint_negative="No effusion or pneumothorax.",
        lungs_clear="Clear lungs.",
        normal_impression="Normal chest radiograph.",
        zone_words=("upper", "middle", "lower"),
    ),
    CxrReportTemplate(
        findings_header="FINDINGS:",
        impression_header="IMPRESSION:",
        preamble=("indication", "technique"),
        order=_HEART_FIRST,
        positive={
            "Cardiomegaly": "[Cardiomegaly, {severity}].",
            "Consolidation": "[{side} {zone} zone consolidation, {severity}].",
            "Edema": "[{Severity} pulm. edema].",
            "Pleural Effusion": "[{side} pleural effusion, {severity}].",
            "Pleural Effusion/bilateral": "[{side} pleural effusions, {severity}].",
            "Pneumothorax": "[{side} PTX, {severity}].",
        },
        negative={
            "Cardiomegaly": "Heart size normal.",
            "Consolidation": "No consolidation.",
            "Edema": "No pulm. edema.",
            "Pleural Effusion": "No pleural effusion.",
            "Pneumothorax": "No PTX.",
        },
        joint_negative="No pleural effusion or PTX.",
        lungs_clear="Lungs clear.",
        normal_impression="No acute disease.",
        side_words=("R", "L", "Bilat."),
    ),
    CxrReportTemplate(
        findings_header="REPORT:",
        impression_header="OPINION:",
        preamble=("indication", "comparison", "technique"),
        order=_HEART_FIRST,
        positive={
            "Cardiomegaly": "[The heart is {adverb} enlarged].",
            "Consolidation": "[{Severity} consolidation in the {side} {zone} zone].",
            "Edema": "[{Severity} pulmonary oedema].",
            "Pleural Effusion": "A [{severity} {side} pleural effusion] is noted.",
            "Pleural Effusion/bilateral": "[{Severity} bilateral pleural effusions] are noted.",
            "Pneumothorax": "A [{severity} {side} pneumothorax] is present.",
        },
        negative={
            "Cardiomegaly": "The heart is not enlarged.",
            "Consolidation": "No consolidation.",
            "Edema": "No pulmonary oedema.",
            "Pleural Effusion": "No pleural effusion.",
            "Pneumothorax": "No pneumothorax.",
        },
        joint_negative="No pleural effusion or pneumothorax.",
        lungs_clear="The lungs are clear.",
        normal_impression="No acute abnormality.",
        zone_words=("upper", "middle", "lower"),
    ),
)
"""Hospital ``k`` writes with template ``k % 5``; hospitals 5–9 reverse the finding order."""

_PHRASE = re.compile(r"\[([^\]]*)\]")


PromptSet = tuple[tuple[str, ...], tuple[str, ...]]
"""Zero-shot prompts of one label: ``(positive phrasings, negative phrasings)``."""

_NEGATED = re.compile(r"\b(no|not)\b", re.IGNORECASE)


def default_prompts() -> dict[str, PromptSet]:
    """Zero-shot prompts per finding, in report wording: a generic pair plus each hospital
    template's own phrasing (an ensemble, averaged in the shared space as in CLIP).

    The positives state the finding (moderate, right, lower zone) the way each template writes
    it ("There is a moderate right pleural effusion.", "R pleural effusion, moderate."). The
    negatives are normal statements of the same anatomy ("The lungs are clear.", "Normal heart
    size."), never negated findings ("No pulmonary edema."): a negated prompt shares the finding's
    words with the positive one, and small text towers learn negation poorly. On the demo's pooled
    client validation split, negated negatives gave edema an AUROC of 0.13 (inverted) and a macro
    AUROC of 0.672, normal statements 0.92 and 0.805 (docs/results.md). One phrasing per template
    makes the score independent of any one hospital's style.

    Example:
        >>> positives, negatives = default_prompts()["Pleural Effusion"]
        >>> positives[:2], negatives[:2]
        (('There is a pleural effusion.', 'There is a moderate right pleural effusion.'), \
('The lungs are clear.', 'The lungs are well expanded and clear.'))
    """
    generic = {
        "Cardiomegaly": ("There is cardiomegaly.", "The heart size is normal."),
        "Consolidation": ("There is a focal consolidation.", "The lungs are clear."),
        "Edema": ("There is pulmonary edema.", "The lungs are clear."),
        "Pleural Effusion": ("There is a pleural effusion.", "The lungs are clear."),
        "Pneumothorax": ("There is a pneumothorax.", "The lungs are clear."),
    }
    prompts = {}
    for label, (positive, negative) in generic.items():
        spec = FindingSpec(
            label,
            severity=1,
            extent=0.0,
            intensity=0.0,
            side=None if label == "Cardiomegaly" else "right",
            zone="lower" if label == "Consolidation" else None,
            centre=None,
            texture_seed=0,
        )
        positives = [positive, *(_sentence(template, spec)[0] for template in REPORT_TEMPLATES)]
        normal = [t.negative["Cardiomegaly"] if label == "Cardiomegaly" else t.lungs_clear for t in REPORT_TEMPLATES]
        negatives = [negative, *(text for text in normal if not _NEGATED.search(text))]
        prompts[label] = (tuple(dict.fromkeys(positives)), tuple(dict.fromkeys(negatives)))
    return prompts


def report_vocabulary() -> list[str]:
    """Every token a generated report or a default prompt can contain, sorted, for building a
    public tokenizer (``build_word_tokenizer(report_vocabulary())``) without reading any report.

    It enumerates what reports are made of instead of sampling them: each template's headers
    and fixed sentences, its sentence for every finding a study can draw (each label × severity ×
    side × zone), every impression item, the indication, technique, comparison, device, bone and
    heart-failure sentences, both sides of :func:`default_prompts` and :data:`NO_FINDING_PROMPTS`.
    Tokens are split as :func:`~fedvlm.data.synthetic_leukemia.report_tokens` (and a BERT
    pre-tokenizer) split them. Reports contain no numbers, so none are listed.

    Returns:
        Lower-cased word and punctuation tokens.

    Example:
        >>> {"effusions", "oedema", "ptx", ":", "."} <= set(report_vocabulary())
        True
    """
    texts: list[str] = [
        INDICATION_HEADER, *INDICATIONS, *TECHNIQUE_SENTENCES.values(), *COMPARISON_SENTENCES.values(),
        LEADS_SENTENCE, *BONE_SENTENCES, HEART_FAILURE_SENTENCE,
    ]  # fmt: skip
    drawable = _drawable_findings()
    for template in REPORT_TEMPLATES:
        texts.extend((template.findings_header, template.impression_header, template.joint_negative))
        texts.extend((template.lungs_clear, template.normal_impression, *template.negative.values()))
        texts.extend(_sentence(template, spec)[0] for spec in drawable)
    texts.extend(_impression_item(spec) for spec in drawable)
    for positives, negatives in (*default_prompts().values(), NO_FINDING_PROMPTS):
        texts.extend((*positives, *negatives))
    return sorted({token for text in texts for token in report_tokens(text)})


def _drawable_findings() -> list[FindingSpec]:
    """One spec per (label, severity, side, zone) that :func:`_sample_finding` can draw."""
    specs: list[FindingSpec] = []
    for label in FINDINGS:
        sides: tuple[str | None, ...] = (None,) if label == "Cardiomegaly" else ("bilateral",)
        if label in SIDE_PROBABILITIES:
            side_probabilities = zip(("right", "left", "bilateral"), SIDE_PROBABILITIES[label], strict=True)
            sides = tuple(side for side, probability in side_probabilities if probability > 0)
        zones: tuple[str | None, ...] = ("upper", "middle", "lower") if label == "Consolidation" else (None,)
        for severity in range(len(SEVERITY_PROBABILITIES)):
            specs.extend(FindingSpec(label, severity, 0.0, side=side, zone=zone) for side in sides for zone in zones)
    return specs


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


def _sentence(template: CxrReportTemplate, spec: FindingSpec) -> tuple[str, str]:
    """The sentence stating ``spec`` in the template's wording, and its finding phrase."""
    key = f"{spec.label}/bilateral"
    text = template.positive[key if spec.side == "bilateral" and key in template.positive else spec.label]
    severity = SEVERITY_WORDS[spec.label][spec.severity]
    side = template.side_words[("right", "left", "bilateral").index(spec.side)] if spec.side else ""
    zone = template.zone_words[("upper", "middle", "lower").index(spec.zone)] if spec.zone else ""
    adverb = SEVERITY_ADVERBS[spec.severity]
    marked = text.format(severity=severity, Severity=severity.capitalize(), adverb=adverb, side=side, zone=zone)
    match = _PHRASE.search(marked)
    assert match is not None, f"template sentence without a [phrase]: {text!r}"
    return _PHRASE.sub(r"\1", marked), match.group(1)


def _impression_item(spec: FindingSpec) -> str:
    """A finding restated in the impression ("Moderate right pleural effusion.")."""
    severity = SEVERITY_WORDS[spec.label][spec.severity].capitalize()
    if spec.label == "Cardiomegaly":
        return f"{severity} cardiomegaly."
    if spec.label == "Edema":
        return f"{severity} pulmonary edema."
    if spec.label == "Consolidation":
        return f"{severity} {spec.side} {spec.zone} zone consolidation."
    plural = "s" if spec.side == "bilateral" and spec.label == "Pleural Effusion" else ""
    return f"{severity} {spec.side} {spec.label.lower()}{plural}."


def write_report(
    rng: np.random.Generator,
    findings: tuple[FindingSpec, ...],
    site_index: int,
    view: str,
    followup: bool,
    leads: bool,
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A report of ``findings`` in the hospital's template, and its finding phrases.

    Args:
        rng: Random source of negations, indication and bone sentences.
        findings: The present findings.
        site_index: The hospital (selects template and sentence order).
        view: ``"PA"`` or ``"AP"`` (technique sentence).
        followup: Whether a prior study exists (comparison sentence).
        leads: Whether monitoring leads are visible (device sentence).

    Returns:
        The report text and ``(label, phrase)`` for each present finding, in report order.
    """
    template = REPORT_TEMPLATES[site_index % len(REPORT_TEMPLATES)]
    order = template.order if (site_index // len(REPORT_TEMPLATES)) % 2 == 0 else template.order[::-1]
    present = {spec.label: spec for spec in findings}
    negate = {label for label in FINDINGS if label not in present and rng.random() < P_NEGATION}
    if not present:  # a normal study always reads as normal
        negate |= {"Cardiomegaly", "Pleural Effusion", "Pneumothorax"}
    preamble = {
        "indication": f"{INDICATION_HEADER} {INDICATIONS[int(rng.integers(len(INDICATIONS)))]}",
        "technique": TECHNIQUE_SENTENCES[view],
        "comparison": COMPARISON_SENTENCES[followup],
    }
    sentences: list[str] = []
    phrases: list[tuple[str, str]] = []
    if not present.keys() - {"Cardiomegaly"}:
        sentences.append(template.lungs_clear)
    joint = {"Pleural Effusion", "Pneumothorax"} <= negate
    for label in order:
        if label in present:
            sentence, phrase = _sentence(template, present[label])
            sentences.append(sentence)
            phrases.append((label, phrase))
        elif joint and label in ("Pleural Effusion", "Pneumothorax"):
            if template.joint_negative not in sentences:
                sentences.append(template.joint_negative)
        elif label in negate:
            sentences.append(template.negative[label])
    if leads:
        sentences.append(LEADS_SENTENCE)
    if rng.random() < 0.4:
        sentences.append(BONE_SENTENCES[int(rng.integers(len(BONE_SENTENCES)))])
    if present:
        impression = [_impression_item(present[label]) for label in order if label in present]
        if {"Cardiomegaly", "Edema"} <= present.keys() and site_index % len(REPORT_TEMPLATES) in (0, 1):
            impression.append(HEART_FAILURE_SENTENCE)
    else:
        impression = [template.normal_impression]
    names = template.preamble
    if followup and "comparison" not in names:  # a follow-up always refers to its prior study
        names = (*names, "comparison")
    head = " ".join(preamble[name] for name in names)
    body = f"{template.findings_header} {' '.join(sentences)} {template.impression_header} {' '.join(impression)}"
    return f"{head} {body}", tuple(phrases)


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


# --- The CXR manifest: PNG images and one CSV row per image ------------------------------------

CXR_MANIFEST_COLUMNS = ("image", "report", "patient", "study", "site")
"""Columns before the label columns; every further column is a label, in file order."""
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def write_cxr_manifest(dataset: CxrDataset, out_dir: Path) -> Path:
    """Write ``dataset`` as ``out_dir/manifest.csv`` plus grayscale PNGs under ``out_dir/images``.

    Columns: ``image`` (path relative to ``out_dir``; a record whose image is already a file
    outside ``out_dir`` keeps its absolute path), ``report``, ``patient``, ``study``, ``site``,
    then one column per label (``1``, ``0``, or empty for unknown). Array images are saved
    losslessly as ``images/<study or patient>.png``. Boxes, masks, phrases and view have no
    column and are not saved.

    Args:
        dataset: The records to write.
        out_dir: Folder for the manifest and its images (created if needed).

    Returns:
        The path of the manifest.

    Raises:
        DataError: When the dataset is empty, a record's labels are invalid, or an image array
            is not ``H×W`` ``uint8``, naming the record.
    """
    out_dir = Path(out_dir)
    if not dataset.records:
        raise DataError(f"cannot write an empty CXR manifest to {out_dir}")
    dataset.validate()
    clashes = set(CXR_MANIFEST_COLUMNS) & {name.lower() for name in dataset.label_names}
    if clashes:
        raise DataError(f"label name(s) {sorted(clashes)} clash with the manifest columns")
    taken: set[str] = set()
    image_cells = []
    for index, record in enumerate(dataset.records):
        if not isinstance(record.image, np.ndarray):
            image_cells.append(_path_cell(Path(record.image), out_dir))
            continue
        if record.image.ndim != 2 or record.image.dtype != np.uint8:
            where = record.source or record.patient
            raise DataError(f"{where}: expected an H×W uint8 image, got {record.image.shape} {record.image.dtype}")
        stem = _UNSAFE_FILE_CHARS.sub("_", record.study or record.patient).strip("._") or str(index)
        while f"{stem}.png".lower() in taken:
            stem = f"{stem}_{index}"
        taken.add(f"{stem}.png".lower())
        relative = f"images/{stem}.png"
        with atomic_destination(out_dir / relative) as temp_path:
            Image.fromarray(record.image, mode="L").save(temp_path, format="PNG")
        image_cells.append(relative)
    manifest_path = out_dir / "manifest.csv"
    with atomic_destination(manifest_path) as temp_path, temp_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow([*CXR_MANIFEST_COLUMNS, *dataset.label_names])
        for record, image_cell in zip(dataset.records, image_cells, strict=True):
            label_cells = ["" if math.isnan(value) else str(int(value)) for value in record.labels]
            writer.writerow([image_cell, record.report, record.patient, record.study, record.site or "", *label_cells])
    return manifest_path


def read_cxr_manifest(path: Path, check_images: bool = True) -> CxrDataset:
    """Read a CXR manifest (as written by :func:`write_cxr_manifest`) into a dataset.

    Every column after ``image, report, patient, study, site`` is a label, named by its header
    (spelling kept); label cells are ``1``/``0`` (``1.0``/``0.0`` accepted) or empty (unknown).
    Images stay paths (relative ones resolved against the manifest's folder); ``report``,
    ``study`` and ``site`` may be empty.

    Args:
        path: The ``manifest.csv``.
        check_images: Check that every image file exists (without decoding it).

    Returns:
        The dataset; each record's ``source`` is ``"<file name>:<line>"``.

    Raises:
        DataError: Naming ``file:line`` and the column for a missing file or column, a row of
            the wrong length, an empty ``image`` or ``patient``, a missing image file, or a
            label that is not 0, 1 or empty.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise DataError(f"CXR manifest {path}: expected a .csv file")
    rows = read_table(path, CXR_MANIFEST_COLUMNS, kind="CXR manifest")  # raises for a missing or empty file
    with path.open(newline="", encoding="utf-8-sig") as stream:
        header = next(csv.reader(stream))
    label_names = tuple(name.strip() for name in header if name.strip().lower() not in CXR_MANIFEST_COLUMNS)
    if not label_names:
        raise DataError(f"{path}:1: no label columns after {', '.join(CXR_MANIFEST_COLUMNS)}")
    records = []
    for row in rows:
        where = f"{path}:{row.line}"
        image_text = row.text("image").strip()
        if not image_text:
            raise DataError(f"{where}: column 'image' is empty")
        image = Path(image_text) if Path(image_text).is_absolute() else path.parent / image_text
        if check_images and not image.is_file():
            raise DataError(f"{where}: column 'image': file not found: {image}")
        patient = row.text("patient").strip()
        if not patient:
            raise DataError(f"{where}: column 'patient' is empty")
        labels = tuple(_parse_label(row.text(name.lower()), f"{where}: column {name!r}") for name in label_names)
        records.append(
            CxrRecord(
                image=image,
                report=row.text("report"),
                labels=labels,
                patient=patient,
                study=row.text("study").strip(),
                site=row.text("site").strip() or None,
                source=f"{path.name}:{row.line}",
            )
        )
    return CxrDataset(records, label_names)


def _parse_label(text: str, where: str) -> float:
    """A label cell: ``1``/``0`` (or ``1.0``/``0.0``) or empty for unknown (nan)."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: cannot parse {text!r} as a label (use 1, 0 or empty)") from None
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: label must be 1, 0 or empty, got {text!r}")
    return value


def _path_cell(image: Path, out_dir: Path) -> str:
    """``image`` relative to ``out_dir`` when inside it (POSIX separators), else absolute."""
    resolved = image.resolve()
    try:
        return resolved.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(resolved)
