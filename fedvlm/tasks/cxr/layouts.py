"""Loaders for the public chest X-ray data sets, each in its published folder layout.

=============== ==========================================================================
``mimic_cxr``   MIMIC-CXR-JPG 2.0.0: ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` with
                ``mimic-cxr-2.0.0-{chexpert,split,metadata}.csv[.gz]`` in the root; reports
                from MIMIC-CXR's ``mimic-cxr-reports`` (``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``)
``chestxray14`` NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``),
                PNGs anywhere under the root (``images_001/images/*.png`` ... or
                ``images/*.png``), optional ``train_val_list.txt``/``test_list.txt`` and
                ``BBox_List_2017.csv``; image-only (reports are ``""``)
``openi``       Indiana University / OpenI: ``ecgen-radiology/<n>.xml`` reports and PNGs named
                by their ``<parentImage id>`` anywhere under the root (``NLMCXR_png/``)
=============== ==========================================================================

Records come back one per image, sorted by image path. What a loader leaves out is counted in
:attr:`~fedvlm.tasks.cxr.records.CxrDataset.skipped` under a reason naming what was dropped;
anything else that does not fit raises :class:`~fedvlm.errors.DataError`:

* **MIMIC-CXR** needs reports: ``reports`` is the ``mimic-cxr-reports`` folder; without it the
  ``.txt`` files are looked for beside the study folders under ``root/files`` (where unzipping
  the reports into the JPG tree puts them), and finding none at all is an error. An image whose
  study has no report file, or whose report has neither FINDINGS nor IMPRESSION, is a counted
  skip. An image without a ``split`` or ``metadata`` row is an error (the files do not belong
  together). A study without a ``chexpert`` row keeps its images with all labels ``nan``
  (MIMIC-CXR-JPG leaves a few studies unlabelled); ``chexpert`` rows for studies without
  images are ignored, so a partial download (``files/p10`` only) loads.
* **ChestX-ray14**: every image listed in ``Data_Entry`` must exist on disk (an error names
  the first missing file and the count); an unknown finding name is an error naming the row.
* **OpenI**: a report listing no image, or with neither FINDINGS nor IMPRESSION, is a counted
  skip of the report; an image id whose file is missing is an error, and finding no image at
  all is an error pointing to :func:`~fedvlm.tasks.cxr.reports.load_openi_reports`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from fedvlm.errors import DataError
from fedvlm.registry import Registry
from fedvlm.tasks.cxr.records import CHESTXRAY14_LABELS, CHEXPERT_LABELS, CxrDataset, CxrRecord, LesionBox
from fedvlm.tasks.cxr.reports import (
    OPENI_LABELS,
    compose_report,
    findings_and_impression,
    load_openi_reports,
    openi_labels,
)
from fedvlm.tasks.cxr.tables import (
    UNCERTAIN_POLICIES,
    read_chestxray14_boxes,
    read_chestxray14_entries,
    read_mimic_chexpert,
    rows_by_key,
)

#: Layout name → loader ``(root, reports, uncertain) -> CxrDataset``.
cxr_formats: Registry[CxrDataset] = Registry("data.format")

MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_SPLITS = frozenset({"train", "validate", "test"})
CHESTXRAY14_ENTRIES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
CHESTXRAY14_BOXES = "BBox_List_2017.csv"
CHESTXRAY14_SPLIT_LISTS = (("train_val_list.txt", "train"), ("test_list.txt", "test"))
OPENI_REPORTS = "ecgen-radiology"
OPENI_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})

SKIP_MIMIC_NO_REPORT = "MIMIC-CXR images whose study has no report file"
SKIP_MIMIC_NO_SECTIONS = "MIMIC-CXR images whose report has neither FINDINGS nor IMPRESSION"
SKIP_OPENI_NO_IMAGES = "OpenI reports listing no image"
SKIP_OPENI_NO_SECTIONS = "OpenI reports with neither FINDINGS nor IMPRESSION"

_MIMIC_GROUP = re.compile(r"p\d\d")
_MIMIC_SUBJECT = re.compile(r"p(\d+)")
_MIMIC_STUDY = re.compile(r"s(\d+)")


@cxr_formats.register("mimic_cxr")
def load_mimic_cxr(root: Path, reports: Path | None, uncertain: str) -> CxrDataset:
    """Load MIMIC-CXR-JPG with its reports (see the module docstring for what is skipped).

    Args:
        root: The ``mimic-cxr-jpg/2.0.0`` folder (``files/`` and the three CSV files).
        reports: The ``mimic-cxr-reports`` folder (holding ``files/``, or the ``files`` folder
            itself); ``None`` looks for the ``.txt`` files under ``root/files``.
        uncertain: Policy for ``-1.0`` labels, a key of :data:`UNCERTAIN_POLICIES`.

    Returns:
        One record per image; labels follow ``CHEXPERT_LABELS``, ``patient`` is the
        ``subject_id``, ``study`` the ``study_id``, ``split`` and ``view`` come from the split and
        metadata files, ``source`` is the image path relative to ``root``.

    Raises:
        DataError: On a missing file or column, a misnamed folder, a bad label value, an image
            without a split or metadata row (or whose row disagrees with its folders), or when
            no report file is found at all.
    """
    images = _mimic_images(root)
    report_dir = _mimic_report_dir(root, reports)
    labels_by_study = read_mimic_chexpert(_find_table(root, MIMIC_CHEXPERT), uncertain)
    split_rows = rows_by_key(_find_table(root, MIMIC_SPLIT), ("dicom_id", "study_id", "subject_id", "split"))
    metadata_rows = rows_by_key(_find_table(root, MIMIC_METADATA), ("dicom_id", "ViewPosition"))
    unlabelled = tuple(math.nan for _ in CHEXPERT_LABELS)
    texts: dict[str, str | None] = {}
    records: list[CxrRecord] = []
    skipped: dict[str, int] = {}
    for path, subject, study in images:
        where = path.relative_to(root).as_posix()
        split_row = split_rows.get(path.stem)
        if split_row is None:
            raise DataError(f"{where}: no row for dicom_id {path.stem} in {MIMIC_SPLIT}[.gz] of {root}")
        if (split_row.cells["subject_id"], split_row.cells["study_id"]) != (subject, study):
            raise DataError(
                f"{split_row.source}: dicom_id {path.stem} belongs to subject {split_row.cells['subject_id']} "
                f"study {split_row.cells['study_id']}, but the image lies in {where}"
            )
        split = split_row.cells["split"]
        if split not in MIMIC_SPLITS:
            raise DataError(f"{split_row.source}: column 'split' must be one of {sorted(MIMIC_SPLITS)}, got {split!r}")
        metadata_row = metadata_rows.get(path.stem)
        if metadata_row is None:
            raise DataError(f"{where}: no row for dicom_id {path.stem} in {MIMIC_METADATA}[.gz] of {root}")
        report_path = report_dir / path.parent.parent.parent.name / path.parent.parent.name / f"s{study}.txt"
        if study not in texts:
            texts[study] = _read_mimic_report(report_path)
        text = texts[study]
        if text is None:
            skipped[SKIP_MIMIC_NO_REPORT] = skipped.get(SKIP_MIMIC_NO_REPORT, 0) + 1
            continue
        if not text:
            skipped[SKIP_MIMIC_NO_SECTIONS] = skipped.get(SKIP_MIMIC_NO_SECTIONS, 0) + 1
            continue
        records.append(
            CxrRecord(
                image=path,
                report=text,
                labels=labels_by_study.get(study, unlabelled),
                patient=subject,
                study=study,
                split=split,
                view=metadata_row.cells["ViewPosition"] or None,
                source=where,
            )
        )
    if not any(text is not None for text in texts.values()):
        raise DataError(
            f"no MIMIC-CXR report files (files/pXX/pNNNNNNNN/sNNNNNNNN.txt) in {report_dir} for the "
            f"{len(images)} images in {root / 'files'}; pass reports=<the mimic-cxr-reports folder>"
        )
    return CxrDataset(records, CHEXPERT_LABELS, skipped)


@cxr_formats.register("chestxray14")
def load_chestxray14(root: Path, reports: Path | None, uncertain: str) -> CxrDataset:
    """Load NIH ChestX-ray14: image-only records (``report`` is ``""``).

    Args:
        root: The folder holding ``Data_Entry_2017.csv`` and the image folders.
        reports: Must be ``None``: the data set has no reports.
        uncertain: Accepted for a uniform signature; ChestX-ray14 has no uncertain labels.

    Returns:
        One record per ``Data_Entry`` row; labels follow ``CHESTXRAY14_LABELS`` (``No Finding``
        is all zeros), ``patient`` is ``Patient ID``, ``study`` the image stem, ``view`` the
        ``View Position``, ``split`` ``train``/``test`` from the list files (``None`` without
        them), ``boxes`` from ``BBox_List_2017.csv`` when present.

    Raises:
        DataError: When a reports path is given, the entry file is missing (or there are two),
            a row is invalid, a listed image is missing on disk, two images share a name, an
            image is in both split lists, or a list or box names an image not in ``Data_Entry``.
    """
    if reports is not None:
        raise DataError(f"ChestX-ray14 has no reports; drop reports={reports}")
    entries_path = _find_table(root, *CHESTXRAY14_ENTRIES)
    entries = read_chestxray14_entries(entries_path)
    listed = {entry.image_name for entry in entries}
    image_paths = _index_files(root, frozenset({".png"}))
    missing = [entry for entry in entries if entry.image_name not in image_paths]
    if missing:
        raise DataError(
            f"{missing[0].source}: image {missing[0].image_name} not found under {root} "
            f"({len(missing)} of {len(entries)} listed images are missing)"
        )
    splits: dict[str, str] = {}
    for list_name, split in CHESTXRAY14_SPLIT_LISTS:
        list_path = root / list_name
        if not list_path.is_file():
            continue
        for line_number, line in enumerate(list_path.read_text().splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            if name not in listed:
                raise DataError(f"{list_path}:{line_number}: image {name} is not in {entries_path.name}")
            if name in splits and splits[name] != split:
                raise DataError(f"{list_path}:{line_number}: image {name} is also in the {splits[name]} list")
            splits[name] = split
    boxes: dict[str, tuple[LesionBox, ...]] = {}
    boxes_path = _optional_table(root, CHESTXRAY14_BOXES)
    if boxes_path is not None:
        boxes = read_chestxray14_boxes(boxes_path)
        stray = sorted(set(boxes) - listed)
        if stray:
            raise DataError(f"{boxes_path}: boxes for image {stray[0]}, which is not in {entries_path.name}")
    records = [
        CxrRecord(
            image=image_paths[entry.image_name],
            report="",
            labels=entry.labels,
            patient=entry.patient,
            study=Path(entry.image_name).stem,
            split=splits.get(entry.image_name),
            view=entry.view,
            source=entry.source,
            boxes=boxes.get(entry.image_name, ()),
        )
        for entry in entries
    ]
    records.sort(key=lambda record: str(record.image))
    return CxrDataset(records, CHESTXRAY14_LABELS)


@cxr_formats.register("openi")
def load_openi(root: Path, reports: Path | None, uncertain: str) -> CxrDataset:
    """Load Indiana University / OpenI: one record per image of each report.

    Args:
        root: The folder holding the images (``NLMCXR_png/``, any depth) and, unless ``reports``
            is given, ``ecgen-radiology/``.
        reports: The ``ecgen-radiology`` folder when it is not under ``root``.
        uncertain: Accepted for a uniform signature; MeSH terms carry no uncertainty.

    Returns:
        Records whose labels follow ``OPENI_LABELS`` (see
        :func:`~fedvlm.tasks.cxr.reports.openi_labels`); ``patient`` and ``study`` are the
        report's ``uId`` (``CXR1``), ``source`` the report file name.

    Raises:
        DataError: When the report folder is missing, no image is found under ``root``, or an
            image a report names is missing.
    """
    open_reports = load_openi_reports(reports if reports is not None else root / OPENI_REPORTS)
    image_paths = _index_files(root, OPENI_IMAGE_SUFFIXES, key=lambda path: path.stem)
    if not image_paths:
        raise DataError(
            f"no OpenI images (CXR<n>_..._IM-....png) under {root}; to read the reports alone use "
            "fedvlm.tasks.cxr.reports.load_openi_reports"
        )
    wanted = [(report, image_id) for report in open_reports for image_id in report.image_ids]
    missing = [(report, image_id) for report, image_id in wanted if image_id not in image_paths]
    if missing:
        report, image_id = missing[0]
        raise DataError(
            f"{report.source}: image {image_id} not found under {root} "
            f"({len(missing)} of {len(wanted)} images the reports name are missing)"
        )
    records: list[CxrRecord] = []
    skipped: dict[str, int] = {}
    for report in open_reports:
        reason = SKIP_OPENI_NO_IMAGES if not report.image_ids else None
        reason = reason or (SKIP_OPENI_NO_SECTIONS if not report.text else None)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        labels = openi_labels(report.mesh_major)
        records.extend(
            CxrRecord(
                image=image_paths[image_id],
                report=report.text,
                labels=labels,
                patient=report.uid,
                study=report.uid,
                source=report.source.name,
            )
            for image_id in report.image_ids
        )
    records.sort(key=lambda record: str(record.image))
    return CxrDataset(records, OPENI_LABELS, skipped)


def detect_cxr_format(root: Path) -> str:
    """Recognise which registered chest X-ray layout ``root`` holds.

    Args:
        root: A data folder.

    Returns:
        A name in :data:`cxr_formats`.

    Raises:
        DataError: When ``root`` is missing, or matches no layout (listing what was looked for
            and the valid ``data.format=`` names).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found (or not a folder): {root}")
    if (root / "files").is_dir() and _optional_table(root, MIMIC_SPLIT) is not None:
        return "mimic_cxr"
    if any(_optional_table(root, name) is not None for name in CHESTXRAY14_ENTRIES):
        return "chestxray14"
    if (root / OPENI_REPORTS).is_dir():
        return "openi"
    raise DataError(
        f"cannot recognise the chest X-ray layout of {root}: looked for files/ and "
        f"{MIMIC_SPLIT}[.gz] (mimic_cxr), {' or '.join(CHESTXRAY14_ENTRIES)}[.gz] (chestxray14), "
        f"{OPENI_REPORTS}/ (openi); set data.format= to one of: {', '.join(cxr_formats.names())}"
    )


def load_cxr(fmt: str, root: Path, reports: Path | None = None, *, uncertain: str = "ignore") -> CxrDataset:
    """Load a chest X-ray data source in a registered layout.

    Args:
        fmt: A name in :data:`cxr_formats`, or ``"auto"`` to :func:`detect_cxr_format`.
        root: The data folder.
        reports: The reports folder when it is separate (MIMIC-CXR's ``mimic-cxr-reports``,
            OpenI's ``ecgen-radiology``); ``None`` for ChestX-ray14.
        uncertain: What CheXpert's uncertain ``-1.0`` becomes: ``"ignore"`` (``nan``),
            ``"zeros"`` or ``"ones"``.

    Returns:
        The dataset, validated; its ``skipped`` counts what was left out and why.

    Raises:
        DataError: When the format or policy is unknown (listing the valid ones), ``root`` is
            missing, or the data are invalid.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found (or not a folder): {root}")
    if uncertain not in UNCERTAIN_POLICIES:  # checked up front: ChestX-ray14 and OpenI never read it
        raise DataError(f"unknown uncertain-label policy {uncertain!r}; valid: {', '.join(UNCERTAIN_POLICIES)}")
    if fmt == "auto":
        fmt = detect_cxr_format(root)
    try:
        loader = cxr_formats.get(fmt)
    except KeyError as error:
        raise DataError(error.args[0]) from None
    dataset = loader(root, None if reports is None else Path(reports), uncertain)
    if not dataset.records:
        skips = "; ".join(f"{reason}: {count}" for reason, count in dataset.skipped.items()) or "nothing found"
        raise DataError(f"no {fmt} records in {root} ({skips})")
    dataset.validate()
    return dataset


def _optional_table(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/name.gz``, ``None`` when neither exists.

    Raises:
        DataError: When both exist.
    """
    found = [path for path in (root / name, root / f"{name}.gz") if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{root} has both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def _find_table(root: Path, *names: str) -> Path:
    """The one of ``names`` (plain or ``.gz``) that exists in ``root``.

    Raises:
        DataError: When none or several exist.
    """
    found = [path for name in names if (path := _optional_table(root, name)) is not None]
    if not found:
        raise DataError(f"{' or '.join(names)}[.gz] not found in {root}")
    if len(found) > 1:
        raise DataError(f"{root} has both {found[0].name} and {found[1].name}; keep one")
    return found[0]


def _mimic_images(root: Path) -> list[tuple[Path, str, str]]:
    """``(path, subject_id, study_id)`` of every ``files/pXX/pN/sN/*.jpg``, sorted by path.

    Raises:
        DataError: When ``files/`` is missing or empty, or a folder is misnamed.
    """
    files = root / "files"
    if not files.is_dir():
        raise DataError(f"MIMIC-CXR-JPG image folder not found: {files}")
    images: list[tuple[Path, str, str]] = []
    for group in _sorted_dirs(files):
        if not _MIMIC_GROUP.fullmatch(group.name):
            raise DataError(f"{group}: expected a pXX group folder (p10 ... p19)")
        for subject_dir in _sorted_dirs(group):
            subject = _MIMIC_SUBJECT.fullmatch(subject_dir.name)
            if subject is None or not subject_dir.name.startswith(group.name):
                raise DataError(f"{subject_dir}: expected a patient folder p<subject_id> starting with {group.name}")
            for study_dir in _sorted_dirs(subject_dir):
                study = _MIMIC_STUDY.fullmatch(study_dir.name)
                if study is None:
                    raise DataError(f"{study_dir}: expected a study folder s<study_id>")
                images.extend(
                    (Path(entry.path), subject.group(1), study.group(1))
                    for entry in sorted(os.scandir(study_dir), key=lambda entry: entry.name)
                    if entry.is_file() and entry.name.lower().endswith(".jpg")
                )
    if not images:
        raise DataError(f"no MIMIC-CXR-JPG images (files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg) in {files}")
    return images


def _mimic_report_dir(root: Path, reports: Path | None) -> Path:
    """The folder whose ``pXX/pN/sN.txt`` are the reports."""
    if reports is None:
        return root / "files"
    if not reports.is_dir():
        raise DataError(f"MIMIC-CXR reports folder not found: {reports}")
    return reports / "files" if (reports / "files").is_dir() else reports


def _read_mimic_report(path: Path) -> str | None:
    """The findings + impression of a report file, ``None`` when the file is missing."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: {error}") from None
    return compose_report(*findings_and_impression(text))


def _sorted_dirs(folder: Path) -> list[Path]:
    return sorted(Path(entry.path) for entry in os.scandir(folder) if entry.is_dir())


def _index_files(
    root: Path, suffixes: frozenset[str], key: Callable[[Path], str] = lambda path: path.name
) -> dict[str, Path]:
    """File name (or ``key(path)``) → path of every file under ``root`` with one of ``suffixes``.

    Raises:
        DataError: When two files share a key.
    """
    found: dict[str, Path] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if Path(name).suffix.lower() not in suffixes:
                continue
            path = Path(folder, name)
            name_key = key(path)
            if name_key in found:
                raise DataError(f"{found[name_key]} and {path} share the name {name_key!r}; keep one")
            found[name_key] = path
    return found
