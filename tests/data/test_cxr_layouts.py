"""Tests of the chest X-ray layouts (MIMIC-CXR-JPG, NIH ChestX-ray14, OpenI), built in fixtures
with the real file, folder and column names, and of their metadata tables; the published
ChestX-ray14 tables shipped by ``torchxrayvision`` are read when it is installed."""

from __future__ import annotations

import gzip
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvlm.errors import DataError
from fedvlm.tasks.cxr.layouts import (
    SKIP_MIMIC_NO_REPORT,
    SKIP_MIMIC_NO_SECTIONS,
    SKIP_OPENI_NO_IMAGES,
    SKIP_OPENI_NO_SECTIONS,
    cxr_formats,
    detect_cxr_format,
    load_cxr,
)
from fedvlm.tasks.cxr.records import CHESTXRAY14_LABELS, CHEXPERT_LABELS, CxrDataset, CxrRecord, LesionBox
from fedvlm.tasks.cxr.reports import OPENI_LABELS
from fedvlm.tasks.cxr.tables import (
    parse_chexpert_value,
    read_chestxray14_boxes,
    read_chestxray14_entries,
    read_mimic_chexpert,
)

NAN = math.nan

# --- MIMIC-CXR-JPG -------------------------------------------------------------------------

CHEXPERT_HEADER = "subject_id,study_id," + ",".join(CHEXPERT_LABELS)
#: Two patients in p10, one in p11; study 50414267 has two images (PA + lateral).
MIMIC_IMAGES = {
    # dicom_id: (subject, study, split, view)
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014": ("10000032", "50414267", "train", "PA"),
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962": ("10000032", "50414267", "train", "LATERAL"),
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab": ("10000032", "53189527", "train", "AP"),
    "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4": ("10000764", "57375967", "validate", ""),
    "8959e402-2175d68d-edba5a6c-520ea5a0-4d2dc6d8": ("10000898", "50771383", "test", "PA"),
    "ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c": ("11000011", "51029426", "train", "PA"),
}
MIMIC_REPORT_50414267 = "\n".join(  # real reports keep blank lines of one space and trailing spaces
    [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        " ",
        " INDICATION:  ___F with new onset ascites  // eval for infection",
        " ",
        " TECHNIQUE:  Chest PA and lateral",
        " ",
        " COMPARISON:  None.",
        " ",
        " FINDINGS: ",
        " ",
        " There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral",
        " nodular opacities that most likely represent nipple shadows. The",
        " cardiomediastinal silhouette is normal.  Clips project over the left lung,",
        " potentially within the breast. The imaged upper abdomen is unremarkable.",
        " Chronic deformity of the posterior left sixth and seventh ribs are noted.",
        " ",
        " IMPRESSION: ",
        " ",
        " No acute cardiopulmonary process.",
        "",
    ]
)
MIMIC_FINDINGS_50414267 = (
    "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that "
    "most likely represent nipple shadows. The cardiomediastinal silhouette is normal. Clips project over "
    "the left lung, potentially within the breast. The imaged upper abdomen is unremarkable. Chronic "
    "deformity of the posterior left sixth and seventh ribs are noted."
)
MIMIC_REPORT_53189527 = "\n".join(  # real reports keep blank lines of one space and trailing spaces
    [
        " WET READ: ___ ___ 10:24 AM",
        "  Lungs clear.",
        " ______________________________________________________________________________",
        "                                 FINAL REPORT",
        " HISTORY:  Shortness of breath.",
        " ",
        " Findings:  PA and lateral views of the chest were obtained.  Compared to prior: no",
        " change.  No pleural effusion.",
        " impression:  Moderate cardiomegaly, unchanged.",
        "",
    ]
)
MIMIC_REPORT_57375967 = """\
                                 FINAL REPORT
 INDICATION:  Fever.

 IMPRESSION:  Right lower lobe pneumonia.
"""
#: No FINDINGS or IMPRESSION header: the whole text is the examination and indication.
MIMIC_REPORT_50771383 = """\
                                 FINAL REPORT
 EXAMINATION:  Chest radiograph, portable.
 INDICATION:  Line placement.
"""
MIMIC_CHEXPERT_ROWS = [
    "10000032,50414267,,,,,,,,,1.0,,,,,",
    "10000032,53189527,,1.0,,-1.0,,,,,,0.0,,,,",
    "10000764,57375967,-1.0,,1.0,,,,,1.0,,,,1.0,,1.0",
    "10000898,50771383,,,,,,,,,1.0,,,,,",
    "19999987,59999999,1.0,,,,,,,,,,,,,",  # a study whose images were not downloaded
]  # study 51029426 (p11) has no row: its labels are unknown


def _write_image(path: Path, suffix_value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), suffix_value, dtype=np.uint8)).save(path)
    return path


def _write_text(path: Path, text: str, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _mimic_report_path(base: Path, subject: str, study: str) -> Path:
    return base / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


def make_mimic(root: Path, reports: Path | None = None, compress: bool = False) -> Path:
    """MIMIC-CXR-JPG in ``root`` and its reports in ``reports/files`` (``root/files`` if None).

    Study 51029426 has no report file, and study 50771383's report has no FINDINGS/IMPRESSION.
    """
    split_lines = ["dicom_id,study_id,subject_id,split"]
    metadata_lines = [
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate"
    ]
    for dicom_id, (subject, study, split, view) in MIMIC_IMAGES.items():
        _write_image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg")
        split_lines.append(f"{dicom_id},{study},{subject},{split}")
        metadata_lines.append(f"{dicom_id},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,21800506")
    _write_text(root / "mimic-cxr-2.0.0-split.csv", "\n".join(split_lines) + "\n", compress)
    _write_text(root / "mimic-cxr-2.0.0-metadata.csv", "\n".join(metadata_lines) + "\n", compress)
    _write_text(
        root / "mimic-cxr-2.0.0-chexpert.csv", "\n".join([CHEXPERT_HEADER, *MIMIC_CHEXPERT_ROWS]) + "\n", compress
    )
    base = root / "files" if reports is None else reports / "files"
    for (subject, study), text in {
        ("10000032", "50414267"): MIMIC_REPORT_50414267,
        ("10000032", "53189527"): MIMIC_REPORT_53189527,
        ("10000764", "57375967"): MIMIC_REPORT_57375967,
        ("10000898", "50771383"): MIMIC_REPORT_50771383,
    }.items():
        _write_text(_mimic_report_path(base, subject, study), text)
    return root


def _chexpert(**present: float) -> tuple[float, ...]:
    """A CheXpert label vector: the given labels (spaces as ``_``), every other one ``nan``."""
    values = {name.replace("_", " "): value for name, value in present.items()}
    return tuple(values.get(name, NAN) for name in CHEXPERT_LABELS)


def _same_labels(actual: tuple[float, ...], expected: tuple[float, ...]) -> bool:
    return np.array_equal(np.array(actual), np.array(expected), equal_nan=True)


def _by_image(dataset: CxrDataset) -> dict[str, CxrRecord]:
    return {_stem(record): record for record in dataset.records}


def _stem(record: CxrRecord) -> str:
    assert isinstance(record.image, Path)  # real layouts hold paths, never arrays
    return record.image.stem


def test_mimic_records_join_images_labels_splits_views_and_reports(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "mimic-cxr-jpg", reports=tmp_path / "mimic-cxr-reports")

    dataset = load_cxr("mimic_cxr", root, tmp_path / "mimic-cxr-reports")

    assert dataset.label_names == CHEXPERT_LABELS
    records = _by_image(dataset)
    assert sorted(records) == sorted(
        [
            "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
            "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
            "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",
            "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4",
        ]
    )
    assert [r.image for r in dataset.records] == sorted(r.image for r in dataset.records)
    pa, lateral = (
        records["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"],
        records["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"],
    )
    assert (pa.patient, pa.study, pa.split, pa.view, pa.site) == ("10000032", "50414267", "train", "PA", None)
    assert (lateral.study, lateral.view) == ("50414267", "LATERAL")
    assert pa.report == lateral.report == f"{MIMIC_FINDINGS_50414267} No acute cardiopulmonary process."
    assert _same_labels(pa.labels, _chexpert(No_Finding=1.0))
    assert pa.source == "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    second = records["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"]
    assert second.report == (
        "PA and lateral views of the chest were obtained. Compared to prior: no change. No pleural effusion. "
        "Moderate cardiomegaly, unchanged."
    )
    assert (second.view, second.split) == ("AP", "train")
    validate = records["096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4"]
    assert (validate.patient, validate.split, validate.view) == ("10000764", "validate", None)
    assert validate.report == "Right lower lobe pneumonia."
    assert dataset.skipped == {SKIP_MIMIC_NO_REPORT: 1, SKIP_MIMIC_NO_SECTIONS: 1}


@pytest.mark.parametrize(("policy", "uncertain_value"), [("ignore", NAN), ("zeros", 0.0), ("ones", 1.0)])
def test_mimic_uncertain_policy(tmp_path: Path, policy: str, uncertain_value: float) -> None:
    root = make_mimic(tmp_path)

    records = _by_image(load_cxr("mimic_cxr", root, None, uncertain=policy))

    # Study 53189527: Cardiomegaly 1.0, Edema -1.0, Pleural Effusion 0.0, the rest blank.
    assert _same_labels(
        records["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"].labels,
        _chexpert(Cardiomegaly=1.0, Edema=uncertain_value, Pleural_Effusion=0.0),
    )
    # Study 57375967: Atelectasis -1.0; Consolidation, Lung Opacity, Pneumonia, Support Devices 1.0.
    assert _same_labels(
        records["096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4"].labels,
        _chexpert(Atelectasis=uncertain_value, Consolidation=1.0, Lung_Opacity=1.0, Pneumonia=1.0, Support_Devices=1.0),
    )


def test_mimic_reads_gzipped_tables_and_reports_beside_the_studies(tmp_path: Path) -> None:
    root = make_mimic(tmp_path, compress=True)
    assert (root / "mimic-cxr-2.0.0-chexpert.csv.gz").is_file()
    assert not (root / "mimic-cxr-2.0.0-chexpert.csv").exists()

    dataset = load_cxr("auto", root, None, uncertain="zeros")

    assert len(dataset.records) == 4
    assert {r.split for r in dataset.records} == {"train", "validate"}
    assert dataset.skipped == {SKIP_MIMIC_NO_REPORT: 1, SKIP_MIMIC_NO_SECTIONS: 1}


def test_mimic_study_without_chexpert_row_keeps_its_images_with_unknown_labels(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    _write_text(_mimic_report_path(root / "files", "11000011", "51029426"), "IMPRESSION: Clear lungs.\n")

    record = _by_image(load_cxr("mimic_cxr", root, None))["ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c"]

    assert (record.patient, record.report, record.split) == ("11000011", "Clear lungs.", "train")
    assert all(math.isnan(value) for value in record.labels)


def test_mimic_without_any_report_files_is_an_error(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "jpg", reports=tmp_path / "elsewhere")

    with pytest.raises(DataError, match=r"no MIMIC-CXR report files .* pass reports=<the mimic-cxr-reports folder>"):
        load_cxr("mimic_cxr", root, None)
    with pytest.raises(DataError, match="reports folder not found: .*nowhere"):
        load_cxr("mimic_cxr", root, tmp_path / "nowhere")


def test_mimic_accepts_the_reports_files_folder_itself(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "jpg", reports=tmp_path / "mimic-cxr-reports")

    dataset = load_cxr("mimic_cxr", root, tmp_path / "mimic-cxr-reports" / "files")

    assert len(dataset.records) == 4


def test_mimic_image_without_split_row_is_an_error(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    _write_image(root / "files" / "p10" / "p10000032" / "s50414267" / "ffffffff-0000.jpg")

    with pytest.raises(DataError, match=r"s50414267/ffffffff-0000\.jpg: no row for dicom_id ffffffff-0000 in "):
        load_cxr("mimic_cxr", root, None)


def test_mimic_split_row_disagreeing_with_the_folders_is_an_error(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    split = root / "mimic-cxr-2.0.0-split.csv"
    split.write_text(
        split.read_text().replace(
            "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527",
            "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,50414267",
        )
    )

    with pytest.raises(DataError, match=r"mimic-cxr-2\.0\.0-split\.csv:4: dicom_id 2a2277a9.* study 50414267"):
        load_cxr("mimic_cxr", root, None)


def test_mimic_bad_chexpert_value_names_file_line_and_column(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    chexpert = root / "mimic-cxr-2.0.0-chexpert.csv"
    chexpert.write_text(chexpert.read_text().replace("10000032,53189527,,1.0", "10000032,53189527,,2.0"))

    with pytest.raises(DataError, match=r"chexpert\.csv:3: column 'Cardiomegaly': expected 1\.0, 0\.0, -1\.0 or blank"):
        load_cxr("mimic_cxr", root, None)


def test_mimic_misnamed_study_folder_is_an_error(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    _write_image(root / "files" / "p10" / "p10000032" / "study1" / "x.jpg")

    with pytest.raises(DataError, match=r"study1: expected a study folder s<study_id>"):
        load_cxr("mimic_cxr", root, None)


def test_read_mimic_chexpert_and_parse_chexpert_value(tmp_path: Path) -> None:
    path = _write_text(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", "\n".join([CHEXPERT_HEADER, *MIMIC_CHEXPERT_ROWS]))

    labels = read_mimic_chexpert(path, "ones")

    assert len(labels) == 5
    assert _same_labels(labels["53189527"], _chexpert(Cardiomegaly=1.0, Edema=1.0, Pleural_Effusion=0.0))
    assert [parse_chexpert_value(text, "ignore", "x") for text in ("1.0", "0.0", "1", "")][:3] == [1.0, 0.0, 1.0]
    assert math.isnan(parse_chexpert_value(" ", "ones", "x"))
    with pytest.raises(DataError, match="here: expected 1.0, 0.0, -1.0 or blank, got 'yes'"):
        parse_chexpert_value("yes", "ignore", "here")


# --- NIH ChestX-ray14 ------------------------------------------------------------------------

CHESTXRAY14_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
CHESTXRAY14_ENTRY_ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,",
    "00000013_005.png,Emphysema|Infiltration|Pleural_Thickening|Pneumothorax,5,13,60,M,AP,3056,2544,0.139,0.139,",
]
CHESTXRAY14_BOX_ROWS = [
    "Image Index,Finding Label,Bbox [x,y,w,h],,,",
    "00000013_005.png,Infiltrate,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,",
    "00000013_005.png,Pneumothorax,686.1,131.5,185.5,313.5,,,",
]


def make_chestxray14(root: Path, nested: bool = True) -> Path:
    """The Kaggle/NIH box layout (``images_00k/images/*.png``), or one flat ``images/`` folder."""
    folders = {"00000001": "images_001/images", "00000002": "images_001/images", "00000013": "images_002/images"}
    for row in CHESTXRAY14_ENTRY_ROWS:
        name = row.split(",")[0]
        _write_image(root / (folders[name[:8]] if nested else "images") / name)
    _write_text(root / "Data_Entry_2017.csv", "\n".join([CHESTXRAY14_ENTRY_HEADER, *CHESTXRAY14_ENTRY_ROWS]) + "\n")
    _write_text(root / "BBox_List_2017.csv", "\n".join(CHESTXRAY14_BOX_ROWS) + "\n")
    _write_text(root / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    _write_text(root / "test_list.txt", "00000013_005.png\n")
    return root


def _chestxray14(*present: str) -> tuple[float, ...]:
    return tuple(1.0 if name in present else 0.0 for name in CHESTXRAY14_LABELS)


@pytest.mark.parametrize("nested", [True, False])
def test_chestxray14_labels_splits_views_boxes(tmp_path: Path, nested: bool) -> None:
    root = make_chestxray14(tmp_path, nested=nested)

    dataset = load_cxr("chestxray14", root, None)

    assert dataset.label_names == CHESTXRAY14_LABELS
    assert dataset.skipped == {}
    records = {_stem(record): record for record in dataset.records}
    assert {stem: records[stem].labels for stem in records} == {
        "00000001_000": _chestxray14("Cardiomegaly"),
        "00000001_001": _chestxray14("Cardiomegaly", "Emphysema"),
        "00000002_000": _chestxray14(),
        "00000013_005": _chestxray14("Emphysema", "Infiltration", "Pleural_Thickening", "Pneumothorax"),
    }
    assert {stem: (r.patient, r.study, r.split, r.view) for stem, r in records.items()} == {
        "00000001_000": ("1", "00000001_000", "train", "PA"),
        "00000001_001": ("1", "00000001_001", "train", "PA"),
        "00000002_000": ("2", "00000002_000", "train", "PA"),
        "00000013_005": ("13", "00000013_005", "test", "AP"),
    }
    assert all(r.report == "" and r.site is None for r in dataset.records)
    assert records["00000013_005"].boxes == (
        LesionBox("Infiltration", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661),
        LesionBox("Pneumothorax", 686.1, 131.5, 185.5, 313.5),
    )
    assert records["00000001_000"].boxes == ()
    assert records["00000013_005"].source == "Data_Entry_2017.csv:5"
    expected_folder = "images_002/images" if nested else "images"
    assert records["00000013_005"].image == root / expected_folder / "00000013_005.png"


def test_chestxray14_without_split_lists_or_boxes(tmp_path: Path) -> None:
    root = make_chestxray14(tmp_path)
    for name in ("train_val_list.txt", "test_list.txt", "BBox_List_2017.csv"):
        (root / name).unlink()

    dataset = load_cxr("auto", root, None)

    assert [(r.split, r.boxes) for r in dataset.records] == [(None, ())] * 4


def test_chestxray14_unknown_finding_names_row_and_valid_names(tmp_path: Path) -> None:
    root = make_chestxray14(tmp_path)
    entries = root / "Data_Entry_2017.csv"
    entries.write_text(entries.read_text().replace("Cardiomegaly|Emphysema", "Cardiomegaly|Emphysemia"))

    with pytest.raises(
        DataError, match=r"Data_Entry_2017\.csv:3: unknown finding 'Emphysemia' .* valid names: Atelectasis, .*Hernia"
    ):
        load_cxr("chestxray14", root, None)


def test_chestxray14_missing_image_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = make_chestxray14(tmp_path)
    (root / "images_001" / "images" / "00000002_000.png").unlink()

    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv:4: image 00000002_000\.png not found .*1 of 4"):
        load_cxr("chestxray14", root, None)


def test_chestxray14_rejects_reports_and_image_in_both_splits(tmp_path: Path) -> None:
    root = make_chestxray14(tmp_path)
    with pytest.raises(DataError, match="ChestX-ray14 has no reports"):
        load_cxr("chestxray14", root, tmp_path)
    _write_text(root / "test_list.txt", "00000013_005.png\n00000001_000.png\n")
    with pytest.raises(DataError, match=r"test_list\.txt:2: image 00000001_000\.png is also in the train list"):
        load_cxr("chestxray14", root, None)


def test_chestxray14_box_file_with_unknown_finding(tmp_path: Path) -> None:
    path = _write_text(tmp_path / "BBox_List_2017.csv", "Image Index,Finding Label,Bbox [x,y,w,h]\na.png,Mas,1,2,3,4\n")

    with pytest.raises(DataError, match=r"BBox_List_2017\.csv:2: unknown finding 'Mas'"):
        read_chestxray14_boxes(path)


def test_chestxray14_entries_missing_column_names_it(tmp_path: Path) -> None:
    path = _write_text(tmp_path / "Data_Entry_2017.csv", "Image Index,Finding Labels,Patient ID\na.png,Mass,1\n")

    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv:1: missing column\(s\) 'View Position'"):
        read_chestxray14_entries(path)


def _torchxrayvision_data(name: str) -> Path:
    """A data file shipped inside the ``torchxrayvision`` package, found without importing it."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision is not installed (pip install --no-deps torchxrayvision)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        pytest.skip(f"this torchxrayvision version ships no {name}")
    return path


@pytest.mark.slow
def test_real_chestxray14_tables_from_torchxrayvision() -> None:
    entries = read_chestxray14_entries(_torchxrayvision_data("Data_Entry_2017_v2020.csv.gz"))
    boxes = read_chestxray14_boxes(_torchxrayvision_data("BBox_List_2017.csv.gz"))

    # The published counts of ChestX-ray14: 112,120 images of 30,805 patients, 984 boxes on 880 images.
    assert len(entries) == 112_120
    assert len({entry.patient for entry in entries}) == 30_805
    positives = dict(zip(CHESTXRAY14_LABELS, np.array([entry.labels for entry in entries]).sum(axis=0), strict=True))
    assert positives["Hernia"] == 227
    assert positives["Infiltration"] == 19_894
    assert sum(not any(entry.labels) for entry in entries) == 60_361  # "No Finding"
    assert {entry.view for entry in entries} == {"PA", "AP"}
    assert sum(len(found) for found in boxes.values()) == 984
    assert len(boxes) == 880
    assert set(boxes) <= {entry.image_name for entry in entries}


# --- Indiana University / OpenI --------------------------------------------------------------

OPENI_XML = """\
<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      {mesh}
   </MeSH>
   {images}
</eCitation>
"""


def openi_xml(n: int, findings: str, impression: str, mesh: list[str], images: list[str]) -> str:
    """An OpenI report in the real ``ecgen-radiology/<n>.xml`` structure."""
    return OPENI_XML.format(
        n=n,
        findings=findings,
        impression=impression,
        mesh="\n      ".join(f"<major>{term}</major>" for term in mesh),
        images="\n   ".join(
            f'<parentImage id="{image}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>'
            f'<panel type="single"><url>/hadoop/storage/radiology/extract/{image}.jpg</url></panel></parentImage>'
            for image in images
        ),
    )


def make_openi(root: Path) -> Path:
    """``ecgen-radiology/`` and ``NLMCXR_png/``; report 3 lists no image, report 4 has no text."""
    reports = {
        1: (
            "The cardiac silhouette and mediastinum size are within normal limits.",
            "Normal chest x-XXXX.",
            ["normal"],
            ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
        ),
        2: (
            "Borderline cardiomegaly. Midline sternotomy XXXX.",
            "No acute pulmonary findings.",
            ["Cardiomegaly/borderline", "Pulmonary Artery/enlarged"],
            ["CXR2_IM-0652-1001"],
        ),
        3: ("Clear lungs.", "", ["normal"], []),
        4: ("", "", ["No Indexing"], ["CXR4_IM-2050-1001"]),
    }
    for n, (findings, impression, mesh, images) in reports.items():
        _write_text(root / "ecgen-radiology" / f"{n}.xml", openi_xml(n, findings, impression, mesh, images))
        for image in images:
            _write_image(root / "NLMCXR_png" / f"{image}.png")
    return root


def test_openi_one_record_per_image_with_mesh_labels_and_counted_skips(tmp_path: Path) -> None:
    root = make_openi(tmp_path)

    dataset = load_cxr("openi", root, None)

    assert dataset.label_names == OPENI_LABELS
    assert [(_stem(r), r.patient, r.study, r.source) for r in dataset.records] == [
        ("CXR1_1_IM-0001-3001", "CXR1", "CXR1", "1.xml"),
        ("CXR1_1_IM-0001-4001", "CXR1", "CXR1", "1.xml"),
        ("CXR2_IM-0652-1001", "CXR2", "CXR2", "2.xml"),
    ]
    normal, _, cardiomegaly = dataset.records
    assert normal.report == "The cardiac silhouette and mediastinum size are within normal limits. Normal chest x-XXXX."
    assert normal.labels == tuple(1.0 if name == "No Finding" else 0.0 for name in OPENI_LABELS)
    assert cardiomegaly.labels == tuple(1.0 if name == "Cardiomegaly" else 0.0 for name in OPENI_LABELS)
    assert (normal.split, normal.view, normal.site) == (None, None, None)
    assert dataset.skipped == {SKIP_OPENI_NO_IMAGES: 1, SKIP_OPENI_NO_SECTIONS: 1}


def test_openi_reports_folder_outside_root(tmp_path: Path) -> None:
    make_openi(tmp_path / "all")
    (tmp_path / "all" / "ecgen-radiology").rename(tmp_path / "reports")

    dataset = load_cxr("openi", tmp_path / "all", tmp_path / "reports")

    assert len(dataset.records) == 3


def test_openi_without_images_points_to_the_reports_reader(tmp_path: Path) -> None:
    root = make_openi(tmp_path)
    for path in (root / "NLMCXR_png").iterdir():
        path.unlink()

    with pytest.raises(DataError, match=r"no OpenI images .*load_openi_reports"):
        load_cxr("openi", root, None)


def test_openi_missing_image_names_report_and_image(tmp_path: Path) -> None:
    root = make_openi(tmp_path)
    (root / "NLMCXR_png" / "CXR2_IM-0652-1001.png").unlink()

    with pytest.raises(DataError, match=r"2\.xml: image CXR2_IM-0652-1001 not found .*1 of 4"):
        load_cxr("openi", root, None)


# --- format detection and the front door -----------------------------------------------------

LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "chestxray14": make_chestxray14,
    "mimic_cxr": make_mimic,
    "openi": make_openi,
}


def test_every_registered_format_has_a_fixture() -> None:
    assert sorted(LAYOUTS) == cxr_formats.names()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_is_detected_and_loads_like_its_explicit_format(tmp_path: Path, name: str) -> None:
    root = LAYOUTS[name](tmp_path / name)

    assert detect_cxr_format(root) == name
    auto = load_cxr("auto", root, None)
    explicit = load_cxr(name, root, None)
    assert [r.image for r in auto.records] == [r.image for r in explicit.records]
    assert auto.skipped == explicit.skipped
    assert np.array_equal(auto.label_matrix(), explicit.label_matrix(), equal_nan=True)


def test_unrecognised_folder_lists_what_was_expected(tmp_path: Path) -> None:
    _write_image(tmp_path / "scan.png")

    with pytest.raises(DataError, match=rf"cannot recognise .* of {tmp_path}: .*mimic_cxr.*chestxray14.*openi"):
        detect_cxr_format(tmp_path)


def test_unknown_format_policy_and_root_are_errors(tmp_path: Path) -> None:
    root = make_openi(tmp_path)

    with pytest.raises(DataError, match="unknown data.format 'padchest'; valid names: chestxray14, mimic_cxr, openi"):
        load_cxr("padchest", root, None)
    with pytest.raises(DataError, match="unknown uncertain-label policy 'maybe'; valid: ignore, zeros, ones"):
        load_cxr("openi", root, None, uncertain="maybe")
    with pytest.raises(DataError, match="data root not found"):
        load_cxr("auto", tmp_path / "missing", None)


def test_two_copies_of_a_table_are_an_error(tmp_path: Path) -> None:
    root = make_mimic(tmp_path)
    _write_text(root / "mimic-cxr-2.0.0-split.csv", "dicom_id,study_id,subject_id,split\n", compress=True)

    with pytest.raises(DataError, match=r"has both mimic-cxr-2\.0\.0-split\.csv and mimic-cxr-2\.0\.0-split\.csv\.gz"):
        load_cxr("mimic_cxr", root, None)
