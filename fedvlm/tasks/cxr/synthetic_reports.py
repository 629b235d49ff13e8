"""The reports of the synthetic chest X-ray generator: one template per hospital (its own section
order, wording and abbreviations), the sentences of each finding, and the zero-shot prompts in
the same wording (:func:`default_prompts`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fedvlm.data.generators import report_tokens
from fedvlm.tasks.cxr.render import (
    FINDINGS,
    FindingSpec,
)

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
    Tokens are split as :func:`~fedvlm.data.generators.report_tokens` (and a BERT
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


SEVERITY_PROBABILITIES = (0.4, 0.4, 0.2)
"""P(mild), P(moderate), P(severe) of a present finding."""


SIDE_PROBABILITIES = {
    "Pleural Effusion": (0.4, 0.3, 0.3),
    "Consolidation": (0.5, 0.5, 0.0),
    "Pneumothorax": (0.5, 0.5, 0.0),
}
"""P(right), P(left), P(bilateral) of a lateralised finding; edema is always bilateral."""


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
