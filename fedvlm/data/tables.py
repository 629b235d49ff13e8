"""CSV and JSONL tables read row by row, with errors naming the file, row and column.

:func:`read_table` reads the manifests of the tasks and the reports files of the image-only
layouts; every bad cell raises :class:`~fedvlm.errors.DataError`, and no row is skipped.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedvlm.errors import DataError


@dataclass(frozen=True)
class TableRow:
    """One data row of a CSV or JSONL table.

    Attributes:
        line: 1-based line number in the file where the row starts (a CSV header is line 1).
        cells: Column name (lower-cased) → value (``str`` for CSV, any JSON value for JSONL).
    """

    line: int
    cells: dict[str, object]

    def text(self, column: str) -> str:
        """The cell as text: ``""`` when the column is absent or JSON ``null``."""
        value = self.cells.get(column)
        return "" if value is None else str(value)


def read_table(path: Path, required_columns: Sequence[str], kind: str) -> list[TableRow]:
    """Read the data rows of a ``.csv`` or ``.jsonl`` table, checking its columns.

    Blank lines carry no data and are passed over; every other line becomes a row or an error.

    Args:
        path: The table file; its suffix picks the format.
        required_columns: Columns every row must have (lower-case).
        kind: What the table is (``"manifest"``, ``"reports file"``), for error messages.

    Returns:
        The rows in file order, at least one.

    Raises:
        DataError: Naming the file (and row) when it is missing, has an unknown suffix, lacks
            required columns, has a malformed line, or has no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{kind} not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows = _read_csv_rows(path, required_columns)
        elif suffix == ".jsonl":
            rows = _read_jsonl_rows(path, required_columns)
        else:
            raise DataError(f"{kind} {path}: unknown suffix {path.suffix!r} (use .csv or .jsonl)")
    except UnicodeDecodeError as error:
        raise DataError(f"{kind} {path} is not UTF-8 text: {error}") from None
    if not rows:
        raise DataError(f"{kind} {path} has no data rows")
    return rows


def _read_csv_rows(path: Path, required_columns: Sequence[str]) -> list[TableRow]:
    """Rows of a CSV file whose first line is the header."""
    # utf-8-sig drops the byte-order mark spreadsheet programs put at the start.
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected a header row naming the columns")
            columns = [column.strip().lower() for column in header]
            _check_columns(path, columns, required_columns, where=f"{path}:1")
            rows: list[TableRow] = []
            start_line = reader.line_num + 1
            for cells in reader:
                # A quoted cell may span lines: a row starts where the previous one ended.
                line, start_line = start_line, reader.line_num + 1
                if not cells:
                    continue
                if len(cells) != len(columns):
                    raise DataError(
                        f"{path}:{line}: row has {len(cells)} cells but the header has "
                        f"{len(columns)} columns ({', '.join(columns)})"
                    )
                rows.append(TableRow(line, dict(zip(columns, cells, strict=True))))
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV: {error}") from None
    return rows


def _read_jsonl_rows(path: Path, required_columns: Sequence[str]) -> list[TableRow]:
    """Rows of a JSON Lines file, one JSON object per line."""
    rows: list[TableRow] = []
    with path.open(encoding="utf-8-sig") as stream:
        for line, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line}: malformed JSON line ({error})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
            cells = {str(key).strip().lower(): cell for key, cell in value.items()}
            _check_columns(path, list(cells), required_columns, where=f"{path}:{line}")
            rows.append(TableRow(line, cells))
    return rows


def _check_columns(path: Path, columns: Sequence[str], required_columns: Sequence[str], where: str) -> None:
    """Raise if a column is duplicated or a required one is missing."""
    duplicated = sorted({column for column in columns if columns.count(column) > 1})
    if duplicated:
        raise DataError(f"{where}: duplicated column(s) {', '.join(map(repr, duplicated))}")
    missing = [column for column in required_columns if column not in columns]
    if missing:
        raise DataError(
            f"{where}: missing required column(s) {', '.join(map(repr, missing))} "
            f"(found: {', '.join(columns) or 'none'})"
        )


def path_cell(image: Path, out_dir: Path) -> str:
    """A table's cell for ``image``: relative to ``out_dir`` when inside it (POSIX separators), else absolute."""
    resolved = image.resolve()
    try:
        return resolved.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(resolved)


_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def new_image_cell(name: str, index: int, taken: set[str], folder: str = "images") -> str:
    """The table cell ``folder/<stem>.png`` of a new image file for sample ``index`` named
    ``name`` (a patient or study id): unsafe characters become ``_``, and a name already in
    ``taken`` (lower-cased: on case-insensitive file systems "P1.png" and "p1.png" collide) gets
    ``_<index>``; the cell is added to ``taken``.

    Example:
        >>> taken: set[str] = set()
        >>> new_image_cell("p 1/a", 0, taken), new_image_cell("P_1_A", 3, taken), new_image_cell("..", 4, taken)
        ('images/p_1_a.png', 'images/P_1_A_3.png', 'images/4.png')
    """
    stem = _UNSAFE_FILE_CHARS.sub("_", name).strip("._") or str(index)
    while f"{folder}/{stem}.png".lower() in taken:
        stem = f"{stem}_{index}"
    cell = f"{folder}/{stem}.png"
    taken.add(cell.lower())
    return cell
