"""Chest X-ray report parsing: MIMIC-CXR free-text sections and Indiana University / OpenI XML.

MIMIC-CXR reports are plain text with section headers (``FINDINGS:``, ``IMPRESSION:``,
``INDICATION:``, a ``FINAL REPORT`` banner ...), sometimes in lower case, with sections spanning
several lines. :func:`parse_report_sections` splits such a text into named sections and
:func:`findings_and_impression` keeps the two that describe the image.

OpenI reports are XML files (``ecgen-radiology/<n>.xml``) whose ``<AbstractText Label=...>``
elements hold the sections, whose ``<MeSH><major>`` terms index the findings
(``Cardiomegaly/mild``, ``normal``) and whose ``<parentImage id=...>`` elements name the
images. :func:`parse_openi_report` reads one file without needing the images;
:func:`openi_labels` maps the MeSH terms onto :data:`OPENI_LABELS`.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from fedvlm.errors import DataError
from fedvlm.tasks.cxr.records import CHEXPERT_LABELS

#: Header names (lower case, single spaces) whose text is the FINDINGS section.
FINDINGS_HEADERS = frozenset({"findings", "finding"})

#: Header names whose text is the IMPRESSION section. Combined headers count as impression.
IMPRESSION_HEADERS = frozenset(
    {
        "impression",
        "impressions",
        "conclusion",
        "conclusions",
        "findings and impression",
        "impression and findings",
        "findings/impression",
    }
)

#: Other headers recognised in any case; an unlisted header is recognised only in capitals,
#: so that an ordinary sentence with a colon ("Compared to prior: ...") is not taken for one.
OTHER_HEADERS = frozenset(
    {
        "addendum",
        "clinical history",
        "clinical indication",
        "clinical information",
        "comparison",
        "comparisons",
        "exam",
        "examination",
        "history",
        "indication",
        "notification",
        "procedure",
        "reason for exam",
        "reason for examination",
        "recommendation",
        "recommendations",
        "technique",
        "type of examination",
        "wet read",
    }
)

#: Banner lines without a colon that end the section before them.
BANNER_LINES = frozenset({"final report", "addendum", "wet read"})

#: Label set of the OpenI loader: the CheXpert observations, in the same order, so IU and
#: MIMIC-CXR records share one label space. Every entry has at least one MeSH rule.
OPENI_LABELS = CHEXPERT_LABELS

#: MeSH major term → labels: ``(heading, qualifier or None, labels)``. A term
#: ``Heading/qualifier/...`` matches a rule with the same heading (case- and space-insensitive)
#: when the rule's qualifier is ``None`` or among the term's qualifiers. Severity qualifiers
#: (``mild``, ``borderline``) do not change the label: a MeSH major term states a finding.
#: Headings not listed here (``Calcified Granuloma``, ``Thoracic Vertebrae``, ``Scoliosis``,
#: ``Surgical Instruments`` ...) map to no label. The choices follow the CheXpert labeller's
#: mention lists (congestion and heart failure count as edema, a blunted costophrenic angle as
#: effusion, pleural thickening as "Pleural Other").
OPENI_MESH_RULES: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    ("Pulmonary Atelectasis", None, ("Atelectasis",)),
    ("Cardiomegaly", None, ("Cardiomegaly",)),
    ("Consolidation", None, ("Consolidation",)),
    ("Pulmonary Edema", None, ("Edema",)),
    ("Pulmonary Congestion", None, ("Edema",)),
    ("Heart Failure", None, ("Edema",)),
    ("Cardiac Shadow", "enlarged", ("Enlarged Cardiomediastinum",)),
    ("Mediastinum", "widened", ("Enlarged Cardiomediastinum",)),
    ("Fractures, Bone", None, ("Fracture",)),
    ("Nodule", None, ("Lung Lesion",)),
    ("Mass", None, ("Lung Lesion",)),
    ("Cysts", None, ("Lung Lesion",)),
    ("Cavitation", None, ("Lung Lesion",)),
    ("Opacity", None, ("Lung Opacity",)),
    ("Density", None, ("Lung Opacity",)),
    ("Airspace Disease", None, ("Lung Opacity",)),
    ("Infiltrate", None, ("Lung Opacity",)),
    ("Pleural Effusion", None, ("Pleural Effusion",)),
    ("Costophrenic Angle", "blunted", ("Pleural Effusion",)),
    ("Hydropneumothorax", None, ("Pleural Effusion", "Pneumothorax")),
    ("Hemopneumothorax", None, ("Pleural Other", "Pneumothorax")),
    ("Hemothorax", None, ("Pleural Other",)),
    ("Thickening", "pleura", ("Pleural Other",)),
    ("Pleura", None, ("Pleural Other",)),
    ("Pneumonia", None, ("Pneumonia",)),
    ("Pneumothorax", None, ("Pneumothorax",)),
    ("Catheters, Indwelling", None, ("Support Devices",)),
    ("Implanted Medical Device", None, ("Support Devices",)),
    ("Medical Device", None, ("Support Devices",)),
    ("Tube, Inserted", None, ("Support Devices",)),
    ("Stents", None, ("Support Devices",)),
)

#: The MeSH major term of a report the indexers found normal.
MESH_NORMAL = "normal"
#: The MeSH major term of a report that was not indexed: its labels are unknown.
MESH_NOT_INDEXED = "No Indexing"

_HEADER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z /&()-]{0,40}?)[ \t]*:", re.MULTILINE)
_BANNER = re.compile(r"^[ \t]*(?P<name>[A-Za-z][A-Za-z ]{0,20}?)[ \t]*$", re.MULTILINE)
_NATURAL_PARTS = re.compile(r"(\d+)")


def _normalise_name(name: str) -> str:
    """Lower case with single spaces: ``" Findings  AND impression"`` → ``"findings and impression"``."""
    return " ".join(name.lower().split())


def _is_header(name: str) -> bool:
    normalised = _normalise_name(name)
    known = normalised in FINDINGS_HEADERS or normalised in IMPRESSION_HEADERS or normalised in OTHER_HEADERS
    return known or (name.strip().isupper() and len(normalised) > 1)


def parse_report_sections(text: str) -> dict[str, str]:
    """Split a free-text radiology report into its named sections.

    A header is a line starting with a name and a colon (``FINDINGS:``, ``Impression:``); text
    after the colon on the same line belongs to the section. A known name (see
    :data:`FINDINGS_HEADERS`, :data:`IMPRESSION_HEADERS`, :data:`OTHER_HEADERS`) is recognised
    in any case, any other name only in capitals. Banner lines such as ``FINAL REPORT`` end the
    section before them. Text before the first header is dropped.

    Args:
        text: The report.

    Returns:
        Section name (lower case, single spaces) → text with runs of whitespace collapsed to one
        space; a section that occurs twice has both texts joined by a space.

    Example:
        >>> parse_report_sections("FINAL REPORT\\nFINDINGS: Clear\\n lungs.\\n\\nImpression:\\nNormal.")
        {'findings': 'Clear lungs.', 'impression': 'Normal.'}
    """
    # (start of header, start of its text, name or None for a banner), in text order.
    marks: list[tuple[int, int, str | None]] = [
        (match.start(), match.end(), _normalise_name(match.group("name")))
        for match in _HEADER.finditer(text)
        if _is_header(match.group("name"))
    ]
    marks += [
        (match.start(), match.end(), None)
        for match in _BANNER.finditer(text)
        if _normalise_name(match.group("name")) in BANNER_LINES
    ]
    marks.sort()
    sections: dict[str, str] = {}
    for index, (_, text_start, name) in enumerate(marks):
        if name is None:
            continue
        text_end = marks[index + 1][0] if index + 1 < len(marks) else len(text)
        body = " ".join(text[text_start:text_end].split())
        if body:
            sections[name] = f"{sections[name]} {body}" if sections.get(name) else body
        else:
            sections.setdefault(name, "")
    return sections


def findings_and_impression(text: str) -> tuple[str, str]:
    """The FINDINGS and IMPRESSION text of a free-text report (``""`` when absent).

    Example:
        >>> findings_and_impression("INDICATION: cough\\nFINDINGS: No effusion.\\nIMPRESSION: Normal.")
        ('No effusion.', 'Normal.')
    """
    sections = parse_report_sections(text)
    findings = " ".join(body for name, body in sections.items() if name in FINDINGS_HEADERS and body)
    impression = " ".join(body for name, body in sections.items() if name in IMPRESSION_HEADERS and body)
    return findings, impression


def compose_report(findings: str, impression: str) -> str:
    """The report text a record carries: findings then impression, joined by a space.

    Example:
        >>> compose_report("Clear lungs.", "Normal chest.")
        'Clear lungs. Normal chest.'
    """
    return " ".join(part for part in (findings.strip(), impression.strip()) if part)


@dataclass(frozen=True)
class OpenIReport:
    """One Indiana University / OpenI report (``ecgen-radiology/<n>.xml``).

    Attributes:
        uid: Report id from ``<uId id=...>`` (``"CXR1"``); the file stem prefixed with ``CXR``
            when the element is missing.
        findings: ``AbstractText Label="FINDINGS"`` (whitespace collapsed, ``""`` when empty).
        impression: ``AbstractText Label="IMPRESSION"``.
        comparison: ``AbstractText Label="COMPARISON"``.
        indication: ``AbstractText Label="INDICATION"``.
        mesh_major: ``<MeSH><major>`` terms in file order (``"Cardiomegaly/mild"``).
        mesh_minor: ``<MeSH><minor>`` or ``<automatic>`` terms (machine-indexed, not used for
            labels).
        image_ids: ``<parentImage id=...>`` values, the image file stems.
        source: The XML file.
    """

    uid: str
    findings: str
    impression: str
    comparison: str
    indication: str
    mesh_major: tuple[str, ...]
    mesh_minor: tuple[str, ...]
    image_ids: tuple[str, ...]
    source: Path

    @property
    def text(self) -> str:
        """Findings and impression (see :func:`compose_report`)."""
        return compose_report(self.findings, self.impression)

    @property
    def is_normal(self) -> bool:
        """Whether the indexers marked the report ``normal``."""
        return any(_normalise_name(term) == MESH_NORMAL for term in self.mesh_major)


def parse_openi_report(xml_path: Path) -> OpenIReport:
    """Read one OpenI report XML file; the images are not needed.

    Args:
        xml_path: An ``ecgen-radiology/<n>.xml`` file.

    Returns:
        The report's sections, MeSH terms and image ids.

    Raises:
        DataError: Naming the file when it is missing, not well-formed XML or not an
            ``<eCitation>`` document.
    """
    xml_path = Path(xml_path)
    try:
        root = ElementTree.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DataError(f"OpenI report not found: {xml_path}") from None
    except ElementTree.ParseError as error:
        raise DataError(f"{xml_path}: not well-formed XML: {error}") from None
    if root.tag != "eCitation":
        raise DataError(f"{xml_path}: expected an OpenI <eCitation> document, found <{root.tag}>")
    sections: dict[str, str] = {}
    for element in root.iter("AbstractText"):
        label = _normalise_name(element.get("Label", ""))
        body = " ".join("".join(element.itertext()).split())
        sections[label] = f"{sections[label]} {body}".strip() if label in sections else body
    uid_element = root.find("uId")
    uid = uid_element.get("id", "") if uid_element is not None else ""
    mesh = root.find("MeSH")
    mesh_major = _element_texts(mesh, "major")
    mesh_minor = _element_texts(mesh, "minor") + _element_texts(mesh, "automatic")
    image_ids = tuple(image_id for e in root.iter("parentImage") if (image_id := e.get("id", "").strip()))
    return OpenIReport(
        uid=uid.strip() or f"CXR{xml_path.stem}",
        findings=sections.get("findings", ""),
        impression=sections.get("impression", ""),
        comparison=sections.get("comparison", ""),
        indication=sections.get("indication", ""),
        mesh_major=mesh_major,
        mesh_minor=mesh_minor,
        image_ids=image_ids,
        source=xml_path,
    )


def load_openi_reports(folder: Path) -> list[OpenIReport]:
    """Read every ``*.xml`` report in ``folder`` (``ecgen-radiology``), in natural file order.

    Args:
        folder: The report folder, or a folder holding ``ecgen-radiology/``.

    Returns:
        One report per XML file (``1.xml``, ``2.xml``, ..., ``10.xml``).

    Raises:
        DataError: When the folder is missing or holds no XML file, or a file is invalid.
    """
    folder = Path(folder)
    if (folder / "ecgen-radiology").is_dir():
        folder = folder / "ecgen-radiology"
    if not folder.is_dir():
        raise DataError(f"OpenI report folder not found: {folder}")
    paths = sorted((path for path in folder.glob("*.xml") if path.is_file()), key=natural_key)
    if not paths:
        raise DataError(f"no OpenI report XML files (ecgen-radiology/<n>.xml) in {folder}")
    return [parse_openi_report(path) for path in paths]


def openi_labels(mesh_major: tuple[str, ...] | list[str]) -> tuple[float, ...]:
    """Map a report's MeSH major terms onto :data:`OPENI_LABELS`.

    ``normal`` gives "No Finding" = 1 and every other label 0. Otherwise each term is matched
    against :data:`OPENI_MESH_RULES`; matched labels are 1, the rest (including "No Finding") 0:
    the indexers list every finding, so an unlisted one is absent. ``No Indexing`` or no term
    at all gives all ``nan`` (unknown).

    Args:
        mesh_major: Terms such as ``("Cardiomegaly/mild", "Opacity/lung/base/left")``.

    Returns:
        One float per entry of :data:`OPENI_LABELS`.

    Example:
        >>> labels = openi_labels(["Cardiomegaly/borderline", "Costophrenic Angle/left/blunted"])
        >>> [name for name, value in zip(OPENI_LABELS, labels) if value == 1]
        ['Cardiomegaly', 'Pleural Effusion']
    """
    terms = [term for term in mesh_major if term.strip()]
    headings = [_normalise_name(term.split("/")[0]) for term in terms]
    if not terms or _normalise_name(MESH_NOT_INDEXED) in headings:
        return tuple(math.nan for _ in OPENI_LABELS)
    if MESH_NORMAL in headings:
        return tuple(1.0 if name == "No Finding" else 0.0 for name in OPENI_LABELS)
    present: set[str] = set()
    for term in terms:
        heading, *qualifiers = (_normalise_name(part) for part in term.split("/"))
        for rule_heading, rule_qualifier, labels in OPENI_MESH_RULES:
            if heading == _normalise_name(rule_heading) and (rule_qualifier is None or rule_qualifier in qualifiers):
                present.update(labels)
    return tuple(1.0 if name in present else 0.0 for name in OPENI_LABELS)


def natural_key(path: Path) -> tuple[tuple[int, str], ...]:
    """Sort key ordering ``2.xml`` before ``10.xml``."""
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in _NATURAL_PARTS.split(path.name))


def _element_texts(parent: ElementTree.Element | None, tag: str) -> tuple[str, ...]:
    if parent is None:
        return ()
    return tuple(text for element in parent.findall(tag) if (text := " ".join((element.text or "").split())))
