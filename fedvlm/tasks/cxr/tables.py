"""The metadata tables of the chest X-ray sets: CSV reading (plain or gzip) and label cells.

* MIMIC-CXR-JPG's ``mimic-cxr-2.0.0-chexpert.csv``: CheXpert labels per study, ``1.0`` present,
  ``0.0`` absent, ``-1.0`` uncertain, blank not mentioned (:func:`read_mimic_chexpert`).
* NIH ChestX-ray14's ``Data_Entry_2017.csv`` (``Finding Labels`` such as
  ``"Cardiomegaly|Effusion"`` or ``"No Finding"``) and ``BBox_List_2017.csv``
  (:func:`read_chestxray14_entries`, :func:`read_chestxray14_boxes`).

Each reads without the images, so the published tables can be checked on their own.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedvlm.errors import DataError
from fedvlm.tasks.cxr.records import CHESTXRAY14_LABELS, CHEXPERT_LABELS, LesionBox

#: Uncertain-label (``-1.0``) policies: ``ignore`` → ``nan``, ``zeros`` → 0, ``ones`` → 1.
UNCERTAIN_POLICIES = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}

CHESTXRAY14_NO_FINDING = "No Finding"
#: ``BBox_List_2017.csv`` spells one finding differently from ``Data_Entry_2017.csv``.
CHESTXRAY14_BOX_ALIASES = {"Infiltrate": "Infiltration"}


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file.

    Attributes:
        line: 1-based line where the row starts (the header is line 1).
        cells: Column name (as in the header, stripped) → cell text (stripped).
        source: ``"<file name>:<line>"`` for error messages.
    """

    line: int
    cells: dict[str, str]
    source: str


@dataclass(frozen=True)
class ChestXray14Entry:
    """One row of ``Data_Entry_2017.csv``.

    Attributes:
        image_name: ``Image Index`` (``"00000001_000.png"``).
        labels: One 0/1 float per :data:`~fedvlm.tasks.cxr.records.CHESTXRAY14_LABELS` entry.
        patient: ``Patient ID``.
        view: ``View Position`` (``PA``/``AP``), ``None`` when blank.
        source: ``"Data_Entry_2017.csv:<line>"``.
    """

    image_name: str
    labels: tuple[float, ...]
    patient: str
    view: str | None
    source: str


def read_csv_rows(path: Path, required_columns: Sequence[str]) -> Iterator[CsvRow]:
    """Read a ``.csv`` or gzip-compressed ``.csv.gz`` file row by row, checking its columns.

    Columns with an empty header (the trailing commas of ``BBox_List_2017.csv``) are ignored.

    Args:
        path: The file.
        required_columns: Header names every row must have (exact spelling).

    Yields:
        The data rows in file order; blank lines are passed over.

    Raises:
        DataError: Naming the file when it is missing, not UTF-8 text or lacks a column, and
            ``file:line`` when a row has fewer cells than the required columns need.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    try:
        with _open_text(path) as stream:
            reader = csv.reader(stream)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in required_columns if name not in header]
            if missing:
                raise DataError(
                    f"{path}:1: missing column(s) {', '.join(map(repr, missing))}; "
                    f"found {', '.join(map(repr, (name for name in header if name)))}"
                )
            needed = max((header.index(name) for name in required_columns), default=-1) + 1
            start_line = reader.line_num + 1
            for cells in reader:
                line, start_line = start_line, reader.line_num + 1
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) < needed:
                    raise DataError(f"{path}:{line}: expected {len(header)} cells, got {len(cells)}")
                row = {name: cell.strip() for name, cell in zip(header, cells, strict=False) if name}
                yield CsvRow(line, row, f"{path.name}:{line}")
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise DataError(f"{path} is not readable UTF-8 CSV text: {error}") from None
    except csv.Error as error:
        raise DataError(f"{path}: malformed CSV: {error}") from None


def parse_chexpert_value(text: str, uncertain: str, where: str) -> float:
    """Parse a CheXpert label cell: ``1.0`` present, ``0.0`` absent, ``-1.0`` uncertain, blank.

    Args:
        text: The cell.
        uncertain: A policy in :data:`UNCERTAIN_POLICIES` for ``-1.0``.
        where: ``file:line: column`` for the error message.

    Returns:
        ``1.0``, ``0.0`` or ``nan`` (blank, or uncertain under ``ignore``).

    Raises:
        DataError: Naming ``where`` when the value is none of the above.

    Example:
        >>> [parse_chexpert_value(v, "zeros", "x") for v in ("1.0", "-1.0", "0")]
        [1.0, 0.0, 0.0]
    """
    if not text.strip():
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if value == -1.0:
        return UNCERTAIN_POLICIES[uncertain]
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: expected 1.0, 0.0, -1.0 or blank, got {text!r}")
    return value


def parse_chestxray14_findings(text: str, where: str) -> tuple[float, ...]:
    """Parse a ``Finding Labels`` cell (``"Cardiomegaly|Effusion"``, ``"No Finding"``).

    Returns:
        One 0/1 float per :data:`~fedvlm.tasks.cxr.records.CHESTXRAY14_LABELS` entry.

    Raises:
        DataError: Naming ``where`` and the unknown name, listing the valid names.

    Example:
        >>> parse_chestxray14_findings("Effusion|Cardiomegaly", "x")[:3]
        (0.0, 1.0, 1.0)
    """
    names = {name.strip() for name in text.split("|") if name.strip()}
    if not names:
        raise DataError(f"{where}: column 'Finding Labels' is empty (use {CHESTXRAY14_NO_FINDING!r})")
    unknown = sorted(names - set(CHESTXRAY14_LABELS) - {CHESTXRAY14_NO_FINDING})
    if unknown:
        raise DataError(
            f"{where}: unknown finding {unknown[0]!r} in column 'Finding Labels'; valid names: "
            f"{', '.join((*CHESTXRAY14_LABELS, CHESTXRAY14_NO_FINDING))}"
        )
    return tuple(1.0 if name in names else 0.0 for name in CHESTXRAY14_LABELS)


def read_chestxray14_entries(path: Path) -> list[ChestXray14Entry]:
    """Read ``Data_Entry_2017.csv`` (plain or ``.gz``) without looking at the images.

    Raises:
        DataError: Naming ``file:line`` for a missing column, an empty or unknown finding, a
            blank image name or patient id, or an image listed twice.
    """
    columns = ("Image Index", "Finding Labels", "Patient ID", "View Position")
    entries: list[ChestXray14Entry] = []
    first_row: dict[str, str] = {}
    for row in read_csv_rows(path, columns):
        image_name, patient = row.cells["Image Index"], row.cells["Patient ID"]
        if not image_name or not patient:
            raise DataError(f"{path}:{row.line}: columns 'Image Index' and 'Patient ID' must not be blank")
        if image_name in first_row:
            raise DataError(f"{path}:{row.line}: image {image_name} is listed again (first at {first_row[image_name]})")
        first_row[image_name] = row.source
        labels = parse_chestxray14_findings(row.cells["Finding Labels"], f"{path}:{row.line}")
        entries.append(ChestXray14Entry(image_name, labels, patient, row.cells["View Position"] or None, row.source))
    if not entries:
        raise DataError(f"{path} has no data rows")
    return entries


def read_chestxray14_boxes(path: Path) -> dict[str, tuple[LesionBox, ...]]:
    """Read ``BBox_List_2017.csv`` (plain or ``.gz``): image name → its lesion boxes.

    ``Infiltrate`` is renamed ``Infiltration``, the spelling of ``Data_Entry_2017.csv``.

    Raises:
        DataError: Naming ``file:line`` for an unknown finding or a coordinate that is not a
            number.
    """
    columns = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
    boxes: dict[str, list[LesionBox]] = {}
    for row in read_csv_rows(path, columns):
        label = row.cells["Finding Label"]
        label = CHESTXRAY14_BOX_ALIASES.get(label, label)
        if label not in CHESTXRAY14_LABELS:
            raise DataError(
                f"{path}:{row.line}: unknown finding {label!r} in column 'Finding Label'; "
                f"valid names: {', '.join(CHESTXRAY14_LABELS)}"
            )
        try:
            x, y, width, height = (float(row.cells[name]) for name in columns[2:])
        except ValueError:
            raise DataError(f"{path}:{row.line}: box coordinates must be numbers") from None
        boxes.setdefault(row.cells["Image Index"], []).append(LesionBox(label, x, y, width, height))
    return {name: tuple(found) for name, found in boxes.items()}


def rows_by_key(path: Path, columns: Sequence[str]) -> dict[str, CsvRow]:
    """Read a CSV file's rows keyed by the first of ``columns`` (all required).

    Only ``columns`` are kept in each row's cells: MIMIC-CXR's tables have 377,110 rows.

    Raises:
        DataError: As :func:`read_csv_rows`, and naming both rows when a key repeats.
    """
    rows: dict[str, CsvRow] = {}
    for row in read_csv_rows(path, columns):
        key = row.cells[columns[0]]
        if key in rows:
            raise DataError(f"{path}:{row.line}: {columns[0]} {key} is repeated (first at {rows[key].source})")
        rows[key] = CsvRow(row.line, {name: row.cells[name] for name in columns}, row.source)
    return rows


def read_mimic_chexpert(path: Path, uncertain: str) -> dict[str, tuple[float, ...]]:
    """Read ``mimic-cxr-2.0.0-chexpert.csv`` (plain or ``.gz``): study_id → label vector.

    Args:
        path: The file (columns ``subject_id``, ``study_id`` and the 14 CheXpert labels).
        uncertain: A policy in :data:`UNCERTAIN_POLICIES` for ``-1.0``.

    Returns:
        One float per :data:`~fedvlm.tasks.cxr.records.CHEXPERT_LABELS` entry for each study.

    Raises:
        DataError: For an unknown policy, naming ``file:line`` and the column for a bad value,
            and the repeated row for a study listed twice.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"unknown uncertain-label policy {uncertain!r}; valid: {', '.join(UNCERTAIN_POLICIES)}")
    labels: dict[str, tuple[float, ...]] = {}
    for study, row in rows_by_key(path, ("study_id", "subject_id", *CHEXPERT_LABELS)).items():
        labels[study] = tuple(
            parse_chexpert_value(row.cells[name], uncertain, f"{path}:{row.line}: column {name!r}")
            for name in CHEXPERT_LABELS
        )
    return labels


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8-sig", newline="")
