"""The chest X-ray manifest: PNG images and one CSV row per image (``image``, ``report``,
``patient``, ``study``, ``site`` and one column per label), written by ``fedvlm data synth --task
cxr`` and read back as ``data.format=manifest``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from fedvlm.data.images import atomic_destination
from fedvlm.data.tables import new_image_cell, path_cell, read_table
from fedvlm.errors import DataError
from fedvlm.tasks.cxr.records import CxrDataset, CxrRecord

CXR_MANIFEST_COLUMNS = ("image", "report", "patient", "study", "site")
"""Columns before the label columns; every further column is a label, in file order."""


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
            image_cells.append(path_cell(Path(record.image), out_dir))
            continue
        if record.image.ndim != 2 or record.image.dtype != np.uint8:
            where = record.source or record.patient
            raise DataError(f"{where}: expected an H×W uint8 image, got {record.image.shape} {record.image.dtype}")
        relative = new_image_cell(record.study or record.patient, index, taken)
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
