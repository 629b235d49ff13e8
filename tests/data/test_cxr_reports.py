"""Tests of chest X-ray report parsing: MIMIC-CXR free-text sections, OpenI XML reports and the
MeSH → label mapping; the 3,955 real OpenI reports shipped by ``torchxrayvision`` are parsed
when it is installed."""

from __future__ import annotations

import importlib.util
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedvlm.errors import DataError
from fedvlm.tasks.cxr.records import CHEXPERT_LABELS
from fedvlm.tasks.cxr.reports import (
    OPENI_LABELS,
    OPENI_MESH_RULES,
    compose_report,
    findings_and_impression,
    load_openi_reports,
    openi_labels,
    parse_openi_report,
    parse_report_sections,
)

MIMIC_REPORT = "\n".join(  # real reports keep blank lines of one space and trailing spaces
    [
        " WET READ: ___ ___ 10:24 AM",
        "  Mild pulmonary edema.",
        " ______________________________________________________________________________",
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PORTABLE AP)",
        " ",
        " INDICATION:  ___ year old woman with dyspnea  // ? CHF",
        " ",
        " COMPARISON:  ___",
        " ",
        " FINDINGS: ",
        " ",
        " Moderate cardiomegaly is stable.  There is mild pulmonary vascular congestion",
        " with small bilateral pleural effusions.  Compared to prior: no pneumothorax.",
        " ",
        " IMPRESSION: ",
        " ",
        " 1.  Mild pulmonary edema.",
        " 2.  Small bilateral pleural effusions.",
        " ",
        " RECOMMENDATION(S):  Follow-up radiograph after diuresis.",
        " ",
        " NOTIFICATION:  The findings were discussed with Dr. ___ at 10:30 on ___.",
        "",
    ]
)
MIMIC_FINDINGS = (
    "Moderate cardiomegaly is stable. There is mild pulmonary vascular congestion with small bilateral pleural "
    "effusions. Compared to prior: no pneumothorax."
)
MIMIC_IMPRESSION = "1. Mild pulmonary edema. 2. Small bilateral pleural effusions."


def test_mimic_sections_span_lines_and_keep_sentences_with_colons() -> None:
    sections = parse_report_sections(MIMIC_REPORT)

    assert sections == {
        "wet read": "___ ___ 10:24 AM Mild pulmonary edema. "
        "______________________________________________________________________________",
        "examination": "CHEST (PORTABLE AP)",
        "indication": "___ year old woman with dyspnea // ? CHF",
        "comparison": "___",
        "findings": MIMIC_FINDINGS,
        "impression": MIMIC_IMPRESSION,
        "recommendation(s)": "Follow-up radiograph after diuresis.",
        "notification": "The findings were discussed with Dr. ___ at 10:30 on ___.",
    }
    assert findings_and_impression(MIMIC_REPORT) == (MIMIC_FINDINGS, MIMIC_IMPRESSION)


def test_lower_case_headers_text_on_the_header_line_and_repeated_sections() -> None:
    text = "Findings: Lungs are clear.\nNo effusion.\nimpression: Normal.\nADDENDUM\nImpression: No change."

    assert parse_report_sections(text) == {
        "findings": "Lungs are clear. No effusion.",
        "impression": "Normal. No change.",
    }


def test_combined_header_counts_as_impression_and_unknown_mixed_case_is_text() -> None:
    text = "FINDINGS AND IMPRESSION:\nNo acute process.\nPortable upright view: clear lungs."

    assert findings_and_impression(text) == ("", "No acute process. Portable upright view: clear lungs.")


def test_report_without_findings_or_impression() -> None:
    text = (
        " FINAL REPORT\n EXAMINATION: Chest radiograph.\n INDICATION: Line placement.\n Tip at the cavoatrial junction."
    )

    assert findings_and_impression(text) == ("", "")
    assert findings_and_impression("no headers at all") == ("", "")
    assert compose_report("", "") == ""
    assert compose_report(" Clear lungs. ", "") == "Clear lungs."
    assert compose_report("Clear lungs.", "Normal.") == "Clear lungs. Normal."


OPENI_XML = """\
<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR2"/>
   <pmcId id="2"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Preop bariatric surgery.</AbstractText>
            <AbstractText Label="FINDINGS">Borderline cardiomegaly. Midline sternotomy XXXX. Enlarged pulmonary
               arteries. Clear lungs.</AbstractText>
            <AbstractText Label="IMPRESSION">No acute pulmonary findings.</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      <major>Cardiomegaly/borderline</major>
      <major>Pulmonary Artery/enlarged</major>
      <automatic>sternotomy</automatic>
   </MeSH>
   <parentImage id="CXR2_IM-0652-1001">
      <figureId>F1</figureId>
      <caption>PA and Lateral Chest. XXXX XXXX XXXX</caption>
      <panel type="single"><url>/hadoop/storage/radiology/extract/CXR2_IM-0652-1001.jpg</url></panel>
   </parentImage>
   <parentImage id="CXR2_IM-0652-2001">
      <figureId>F2</figureId>
   </parentImage>
</eCitation>
"""


def test_parse_openi_report_reads_sections_mesh_and_images(tmp_path: Path) -> None:
    path = tmp_path / "2.xml"
    path.write_text(OPENI_XML)

    report = parse_openi_report(path)

    assert report.uid == "CXR2"
    assert (
        report.findings == "Borderline cardiomegaly. Midline sternotomy XXXX. Enlarged pulmonary arteries. Clear lungs."
    )
    assert report.impression == "No acute pulmonary findings."
    assert (report.comparison, report.indication) == ("None.", "Preop bariatric surgery.")
    assert report.mesh_major == ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged")
    assert report.mesh_minor == ("sternotomy",)
    assert report.image_ids == ("CXR2_IM-0652-1001", "CXR2_IM-0652-2001")
    assert report.text == f"{report.findings} {report.impression}"
    assert not report.is_normal
    assert report.source == path


def test_parse_openi_report_with_empty_sections_and_no_uid(tmp_path: Path) -> None:
    path = tmp_path / "7.xml"
    path.write_text(
        '<eCitation><Abstract><AbstractText Label="FINDINGS"/><AbstractText Label="IMPRESSION">Normal.'
        "</AbstractText></Abstract><MeSH><major>normal</major></MeSH></eCitation>"
    )

    report = parse_openi_report(path)

    assert (report.uid, report.findings, report.impression, report.image_ids) == ("CXR7", "", "Normal.", ())
    assert report.is_normal


def test_parse_openi_report_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "3.xml"
    broken.write_text("<eCitation><MeSH></eCitation>")
    other = tmp_path / "4.xml"
    other.write_text("<PubmedArticle/>")

    with pytest.raises(DataError, match=r"3\.xml: not well-formed XML"):
        parse_openi_report(broken)
    with pytest.raises(DataError, match=r"4\.xml: expected an OpenI <eCitation> document, found <PubmedArticle>"):
        parse_openi_report(other)
    with pytest.raises(DataError, match=r"OpenI report not found: .*5\.xml"):
        parse_openi_report(tmp_path / "5.xml")


def test_load_openi_reports_in_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "ecgen-radiology"
    folder.mkdir()
    for n in (10, 2, 1):
        (folder / f"{n}.xml").write_text(OPENI_XML.replace('id="CXR2"', f'id="CXR{n}"'))

    assert [report.uid for report in load_openi_reports(tmp_path)] == ["CXR1", "CXR2", "CXR10"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no OpenI report XML files"):
        load_openi_reports(tmp_path / "empty")
    with pytest.raises(DataError, match="OpenI report folder not found"):
        load_openi_reports(tmp_path / "missing")


def _present(labels: tuple[float, ...]) -> list[str]:
    return [name for name, value in zip(OPENI_LABELS, labels, strict=True) if value == 1.0]


def test_openi_labels_follow_the_mesh_rules() -> None:
    assert OPENI_LABELS == CHEXPERT_LABELS
    normal = openi_labels(["normal"])
    assert _present(normal) == ["No Finding"]
    assert sum(normal) == 1.0
    assert all(math.isnan(value) for value in openi_labels(["No Indexing"]))
    assert all(math.isnan(value) for value in openi_labels([]))
    unmapped = openi_labels(["Calcified Granuloma/lung/upper lobe/right", "Thoracic Vertebrae/degenerative"])
    assert unmapped == tuple(0.0 for _ in OPENI_LABELS)
    assert _present(openi_labels(["Costophrenic Angle/left/blunted/mild", "Costophrenic Angle/obscured"])) == [
        "Pleural Effusion"
    ]
    assert _present(openi_labels(["Thickening/pleura/apex/bilateral", "Thickening/bronchi"])) == ["Pleural Other"]
    assert _present(openi_labels(["Hydropneumothorax/right"])) == ["Pleural Effusion", "Pneumothorax"]
    assert _present(openi_labels(["pulmonary  atelectasis/base/left", "Opacity/lung/base/left"])) == [
        "Atelectasis",
        "Lung Opacity",
    ]
    assert _present(openi_labels(["Cardiac Shadow/enlarged/mild", "Catheters, Indwelling"])) == [
        "Enlarged Cardiomediastinum",
        "Support Devices",
    ]


def test_every_openi_label_has_a_mesh_rule() -> None:
    ruled = {label for _, _, labels in OPENI_MESH_RULES for label in labels}

    assert ruled | {"No Finding"} == set(OPENI_LABELS)


def _real_openi_reports(tmp_path: Path) -> Path:
    """Unpack ``NLMCXR_reports.tgz`` from the installed ``torchxrayvision`` (not imported: it
    needs scikit-image) into ``tmp_path``."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision is not installed (pip install --no-deps torchxrayvision)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"
    if not archive.is_file():
        pytest.skip(f"this torchxrayvision version ships no {archive.name}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp_path, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            tar.extractall(tmp_path)  # a fixed archive from an installed package
    return tmp_path / "ecgen-radiology"


@pytest.mark.slow
def test_all_real_openi_reports_parse(tmp_path: Path) -> None:
    reports = load_openi_reports(_real_openi_reports(tmp_path))

    # The published collection: 3,955 reports naming 7,470 images.
    assert len(reports) == 3955
    assert len({report.uid for report in reports}) == 3955
    assert sum(len(report.image_ids) for report in reports) == 7470
    assert sum(bool(report.text) for report in reports) == 3927
    assert sum(bool(report.findings) for report in reports) == 3425
    assert sum(bool(report.impression) for report in reports) == 3921
    assert sum(report.is_normal for report in reports) == 1391  # 35 %
    assert sum(not report.image_ids for report in reports) == 104
    labels = np.array([openi_labels(report.mesh_major) for report in reports])
    assert np.isnan(labels[:, 0]).sum() == 95  # "No Indexing"
    positives = dict(zip(OPENI_LABELS, np.nansum(labels, axis=0), strict=True))
    assert positives["No Finding"] == 1391
    assert positives["Cardiomegaly"] == 375
    assert 300 < positives["Atelectasis"] < positives["Lung Opacity"]

    first, second = reports[0], reports[1]
    assert first.uid == "CXR1"
    assert first.findings == (
        "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. "
        "There is no focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of "
        "pneumothorax."
    )
    assert (first.impression, first.indication, first.mesh_major) == (
        "Normal chest x-XXXX.",
        "Positive TB test",
        ("normal",),
    )
    assert first.image_ids == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
    assert second.uid == "CXR2"
    assert second.mesh_major == ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged")
    assert _present(openi_labels(second.mesh_major)) == ["Cardiomegaly"]
    by_uid = {report.uid: report for report in reports}
    assert by_uid["CXR1000"].mesh_major == (
        "Opacity/lung/upper lobe/right",
        "Pulmonary Atelectasis/upper lobe/right",
        "Opacity/lung/lingula",
    )
    assert by_uid["CXR1000"].impression.startswith("1. Increased opacity in the right upper lobe with XXXX")
