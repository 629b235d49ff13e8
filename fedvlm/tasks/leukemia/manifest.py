"""The canonical multimodal manifest: one row per image with its report and labels.

A manifest is a CSV or JSONL file (chosen by suffix) with the columns

============ ===================================================================
``image``    image path, relative to the manifest's folder (absolute paths allowed)
``report``   the clinical narrative; must not be blank
``leukemia`` ``0`` or ``1``
``stage``    empty for negatives (and unknown stages), else ``1..K`` or ``I..IV``
``site``     optional acquisition site
``patient``  optional patient id; defaults to the image file's stem
============ ===================================================================

Every bad cell raises :class:`~fedvlm.errors.DataError` naming the file, row and column; no row
is skipped; the rows are read by :func:`fedvlm.data.tables.read_table`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedvlm.data.images import atomic_destination, write_image
from fedvlm.data.tables import TableRow, new_image_cell, path_cell, read_table
from fedvlm.errors import DataError
from fedvlm.tasks.leukemia.records import NUM_STAGES_DEFAULT, LeukemiaRecord, parse_stage

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
REQUIRED_COLUMNS = ("image", "report", "leukemia", "stage")
MANIFEST_COLUMNS = (*REQUIRED_COLUMNS, "site", "patient")
IMAGES_FOLDER = "images"


def read_manifest(path: Path, num_stages: int = NUM_STAGES_DEFAULT, check_images: bool = True) -> list[LeukemiaRecord]:
    """Read a manifest into records, in file order.

    Args:
        path: The ``.csv`` or ``.jsonl`` manifest.
        num_stages: Number of clinical stages ``K``; stages must lie in ``1..K``.
        check_images: Check that every image file exists (without decoding it).

    Returns:
        One record per data row; ``source`` is ``"<manifest file name>:<line>"``.

    Raises:
        DataError: Naming the file, row and column for a missing manifest or column, a bad
            ``leukemia`` or ``stage`` value, a stage on a negative, a blank report, a missing
            image file, a malformed JSON line, or an empty manifest.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "m.csv").write_text(
        ...     "image,report,leukemia,stage\\na.png,fatigue,1,II\\n")
        >>> record, = read_manifest(folder / "m.csv", check_images=False)
        >>> record.stage, record.patient, record.source
        (1, 'a', 'm.csv:2')
    """
    path = Path(path)
    rows = read_table(path, REQUIRED_COLUMNS, kind="manifest")
    return [_record_from_row(row, path, num_stages, check_images) for row in rows]


def write_manifest(
    records: Iterable[LeukemiaRecord],
    out_dir: Path,
    name: str = "manifest.csv",
    *,
    num_stages: int = NUM_STAGES_DEFAULT,
) -> Path:
    """Write records as a CSV manifest that :func:`read_manifest` reads back unchanged.

    Array images are saved losslessly as ``out_dir/images/<patient>.png`` (the record's index
    is appended when two records share a patient, and used alone when the patient is empty).
    Path images are referenced relative to ``out_dir`` when they lie inside it, else by their
    absolute path. Every record is checked before anything is written, and each file is
    written atomically, so a failure leaves no half-written file. ``blast_points`` and
    ``signal_words`` have no manifest column and are not saved.

    Args:
        records: The records to save.
        out_dir: Folder for the manifest and its ``images/`` (created if needed).
        name: File name of the manifest; must end in ``.csv``.
        num_stages: Number of clinical stages ``K`` the records' stages are checked against.

    Returns:
        The path of the written manifest.

    Raises:
        DataError: Naming the record's source when a record is invalid, has a blank report, a
            missing image file or an image array that is not ``H×W×3`` ``uint8``; or when
            ``records`` is empty or ``name`` is not a ``.csv`` name.
    """
    out_dir = Path(out_dir)
    records = list(records)
    if not records:
        raise DataError(f"cannot write an empty manifest to {out_dir / name}")
    if Path(name).suffix.lower() != ".csv" or Path(name).name != name:
        raise DataError(f"manifest name must be a plain .csv file name, got {name!r}")
    for index, record in enumerate(records):
        _check_writable(record, index, num_stages)

    image_cells = _save_images(records, out_dir)
    manifest_path = out_dir / name
    with (
        atomic_destination(manifest_path) as temp_path,
        temp_path.open("w", newline="", encoding="utf-8") as stream,
    ):
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for record, image_cell in zip(records, image_cells, strict=True):
            stage_cell = "" if record.stage is None else str(record.stage + 1)
            writer.writerow([image_cell, record.report, record.leukemia, stage_cell, record.site or "", record.patient])
    return manifest_path


def _parse_leukemia(text: str, where: str) -> int:
    """Parse a ``leukemia`` cell (``0``/``1``, ``1.0`` accepted) into 0 or 1."""
    try:
        value = float(text.strip())
    except ValueError:
        raise DataError(f"{where}: cannot parse {text!r} as a label (use 0 or 1)") from None
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: label must be 0 or 1, got {text.strip()!r}")
    return int(value)


def _record_from_row(row: TableRow, path: Path, num_stages: int, check_images: bool) -> LeukemiaRecord:
    """Turn one manifest row into a checked record."""
    where = f"{path}:{row.line}"
    image_text = row.text("image").strip()
    if not image_text:
        raise DataError(f"{where}: column 'image' is empty")
    image = Path(image_text)
    if not image.is_absolute():
        image = path.parent / image
    leukemia = _parse_leukemia(row.text("leukemia"), f"{where}: column 'leukemia'")
    stage = parse_stage(row.text("stage"), num_stages, f"{where}: column 'stage'")
    if stage is not None and leukemia == 0:
        raise DataError(f"{where}: column 'stage': a negative sample (leukemia=0) cannot have a stage")
    report = row.text("report")
    if not report.strip():
        raise DataError(f"{where}: column 'report' is empty")
    if check_images and not image.is_file():
        raise DataError(f"{where}: column 'image': file not found: {image}")
    record = LeukemiaRecord(
        image=image,
        report=report,
        leukemia=leukemia,
        stage=stage,
        patient=row.text("patient").strip() or image.stem,
        site=row.text("site").strip() or None,
        source=f"{path.name}:{row.line}",
    )
    record.validate(num_stages)
    return record


def _check_writable(record: LeukemiaRecord, index: int, num_stages: int) -> None:
    """Raise if ``record`` could not be written, or would not be read back."""
    where = f"cannot write record {index} ({record.source or record.patient})"
    try:
        record.validate(num_stages)
    except DataError as error:
        raise DataError(f"cannot write record {index}: {error}") from None
    if not record.report.strip():
        raise DataError(f"{where}: the report is empty; a manifest needs one per image")
    if isinstance(record.image, np.ndarray):
        shape, dtype = record.image.shape, record.image.dtype
        if len(shape) != 3 or shape[2] != 3 or dtype != np.uint8:
            raise DataError(f"{where}: expected an H×W×3 uint8 image, got {shape} {dtype}")
    elif not Path(record.image).is_file():
        raise DataError(f"{where}: image file not found: {record.image}")


def _save_images(records: Sequence[LeukemiaRecord], out_dir: Path) -> list[str]:
    """Save array images under ``out_dir/images``; the manifest ``image`` cell of each record."""
    cells: list[str | None] = [
        None if isinstance(record.image, np.ndarray) else path_cell(Path(record.image), out_dir) for record in records
    ]
    # Lower-cased, because on case-insensitive file systems "P1.png" and "p1.png" collide.
    taken = {cell.lower() for cell in cells if cell is not None}
    for index, record in enumerate(records):
        if not isinstance(record.image, np.ndarray):
            continue
        relative = new_image_cell(record.patient, index, taken, IMAGES_FOLDER)
        write_image(out_dir / relative, record.image)
        cells[index] = relative
    return [cell for cell in cells if cell is not None]
