"""Tests of the CSV/JSONL manifest: reading, every rejected row, and the write → read round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvlm.data.images import read_image
from fedvlm.errors import DataError
from fedvlm.tasks.leukemia.manifest import read_manifest, write_manifest
from fedvlm.tasks.leukemia.records import LeukemiaRecord

COLUMNS = "image,report,leukemia,stage\n"
HEADER = "image,report,leukemia,stage,site,patient\n"


def _write_png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _manifest(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_csv_manifest_rows_become_records(tmp_path: Path) -> None:
    _write_png(tmp_path / "img" / "a.png")
    _write_png(tmp_path / "img" / "b.png")
    _write_png(tmp_path / "img" / "c.png")
    path = _manifest(
        tmp_path,
        HEADER
        + "img/a.png,fatigue and bruising,1,II,lab-A,P1\n"
        + "img/b.png,routine check,0,,,\n"
        + "img/c.png,fever,1,3,lab-B,P1\n",
    )

    records = read_manifest(path)

    assert [r.leukemia for r in records] == [1, 0, 1]
    assert [r.stage for r in records] == [1, None, 2]
    assert [r.report for r in records] == ["fatigue and bruising", "routine check", "fever"]
    assert [r.site for r in records] == ["lab-A", None, "lab-B"]
    assert [r.patient for r in records] == ["P1", "b", "P1"]  # default: the image stem
    assert [r.source for r in records] == ["manifest.csv:2", "manifest.csv:3", "manifest.csv:4"]
    assert records[0].image == tmp_path / "img" / "a.png"


def test_csv_source_is_the_line_where_a_multiline_row_starts(tmp_path: Path) -> None:
    path = _manifest(
        tmp_path,
        COLUMNS + 'a.png,"line one\nline two",1,1\n' + "b.png,next,0,\n",
    )

    records = read_manifest(path, check_images=False)

    assert records[0].report == "line one\nline two"
    assert [r.source for r in records] == ["manifest.csv:2", "manifest.csv:4"]


def test_jsonl_manifest_with_absolute_image_path(tmp_path: Path) -> None:
    image = _write_png(tmp_path / "elsewhere" / "smear.png")
    rows = [
        {"image": str(image), "report": "pallor", "leukemia": 1, "stage": "IV", "site": "s1"},
        {"image": str(image), "report": "healthy", "leukemia": 0, "stage": None},
    ]
    folder = tmp_path / "data"
    folder.mkdir()
    path = _manifest(folder, "\n".join(json.dumps(row) for row in rows) + "\n", "manifest.jsonl")

    records = read_manifest(path)

    assert [(r.leukemia, r.stage, r.site, r.patient) for r in records] == [
        (1, 3, "s1", "smear"),
        (0, None, None, "smear"),
    ]
    assert records[0].image == image
    assert [r.source for r in records] == ["manifest.jsonl:1", "manifest.jsonl:2"]


def test_check_images_false_does_not_look_at_the_files(tmp_path: Path) -> None:
    path = _manifest(tmp_path, COLUMNS + "ghost.png,text,0,\n")

    (record,) = read_manifest(path, check_images=False)

    assert record.image == tmp_path / "ghost.png"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image,report\na.png,x\n", r"manifest\.csv:1: missing required column\(s\) 'leukemia', 'stage'"),
        ("image,report,leukemia,stage,stage\na.png,x,1,,\n", r"manifest\.csv:1: duplicated column\(s\) 'stage'"),
        (COLUMNS + "a.png,x,1,\nb.png,y,yes,\n", r"manifest\.csv:3: column 'leukemia': cannot parse 'yes'"),
        (COLUMNS + "a.png,x,2,\n", r"manifest\.csv:2: column 'leukemia': label must be 0 or 1, got '2'"),
        (COLUMNS + "a.png,x,1,5\n", r"manifest\.csv:2: column 'stage': stage '5' is out of range 1\.\.4"),
        (COLUMNS + "a.png,x,1,V\n", r"manifest\.csv:2: column 'stage': cannot parse stage 'V'"),
        (COLUMNS + "a.png,x,0,II\n", r"manifest\.csv:2: column 'stage': a negative sample"),
        (COLUMNS + "a.png,   ,1,1\n", r"manifest\.csv:2: column 'report' is empty"),
        (COLUMNS + ",x,1,1\n", r"manifest\.csv:2: column 'image' is empty"),
        (COLUMNS + "ghost.png,x,1,1\n", r"manifest\.csv:2: column 'image': file not found: .*ghost\.png"),
        (COLUMNS + "a.png,x,1\n", r"manifest\.csv:2: row has 3 cells but the header has 4"),
        (COLUMNS, r"manifest .*manifest\.csv has no data rows"),
        ("", r"manifest\.csv is empty; expected a header row"),
    ],
)
def test_bad_csv_manifest_names_file_row_and_column(tmp_path: Path, text: str, match: str) -> None:
    _write_png(tmp_path / "a.png")
    path = _manifest(tmp_path, text)

    with pytest.raises(DataError, match=match):
        read_manifest(path)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (
            ['{"image": "a.png", "report": "x", "leukemia": 1, "stage": 1}', '{"image": "a.png",'],
            r"manifest\.jsonl:2: malformed JSON line",
        ),
        (['["a.png", "x", 1, 1]'], r"manifest\.jsonl:1: expected a JSON object, got list"),
        (['{"image": "a.png", "leukemia": 1}'], r"manifest\.jsonl:1: missing required column\(s\) 'report', 'stage'"),
        (["", "  "], r"manifest .*manifest\.jsonl has no data rows"),
    ],
)
def test_bad_jsonl_manifest_names_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    _write_png(tmp_path / "a.png")
    path = _manifest(tmp_path, "\n".join(lines) + "\n", "manifest.jsonl")

    with pytest.raises(DataError, match=match):
        read_manifest(path)


def test_missing_manifest_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest not found: .*nope\.csv"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"manifest\.xlsx: unknown suffix '\.xlsx'"):
        read_manifest(_manifest(tmp_path, "whatever", "manifest.xlsx"))


def test_num_stages_bounds_the_stage(tmp_path: Path) -> None:
    path = _manifest(tmp_path, COLUMNS + "a.png,x,1,3\n")

    assert read_manifest(path, num_stages=3, check_images=False)[0].stage == 2
    with pytest.raises(DataError, match=r"stage '3' is out of range 1\.\.2"):
        read_manifest(path, num_stages=2, check_images=False)


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


def test_write_then_read_gives_back_labels_reports_and_identical_pixels(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    inside = _write_png(out_dir / "raw" / "inside.png", value=40)
    outside = _write_png(tmp_path / "elsewhere" / "outside.png", value=90)
    records = [
        LeukemiaRecord(_pixels(0), "fatigue, WBC 48", 1, 2, "P1", site="lab-A"),
        LeukemiaRecord(_pixels(1), "second smear of P1", 1, 2, "P1", site="lab-A"),
        LeukemiaRecord(_pixels(2), '  quoted "text",\nnew line ', 0, None, "P/2"),
        LeukemiaRecord(inside, "inside", 1, None, "P3", site="lab-B"),
        LeukemiaRecord(outside, "outside", 0, None, "P4"),
    ]

    manifest = write_manifest(records, out_dir)
    loaded = read_manifest(manifest)

    assert manifest == out_dir / "manifest.csv"
    for before, after in zip(records, loaded, strict=True):
        assert (after.leukemia, after.stage, after.report, after.site, after.patient) == (
            before.leukemia,
            before.stage,
            before.report,
            before.site,
            before.patient,
        )
        expected = before.image if isinstance(before.image, np.ndarray) else read_image(Path(before.image))
        assert isinstance(after.image, Path)
        np.testing.assert_array_equal(read_image(after.image), expected)
    with manifest.open(newline="") as stream:
        cells = [row["image"] for row in csv.DictReader(stream)]
    assert cells == ["images/P1.png", "images/P1_1.png", "images/P_2.png", "raw/inside.png", str(outside)]
    assert not [path for path in out_dir.rglob("*.tmp")]


def test_write_manifest_checks_every_record_before_writing_anything(tmp_path: Path) -> None:
    records = [
        LeukemiaRecord(_pixels(0), "ok", 1, 0, "P1"),
        LeukemiaRecord(np.zeros((8, 8), dtype=np.uint8), "gray", 0, None, "P2", source="gen:2"),
    ]

    with pytest.raises(DataError, match=r"record 1 \(gen:2\): expected an H×W×3 uint8 image"):
        write_manifest(records, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (LeukemiaRecord(_pixels(0), "  ", 1, None, "P1"), r"record 0 \(P1\): the report is empty"),
        (LeukemiaRecord(_pixels(0), "x", 0, 1, "P1"), r"record 0: P1: a negative sample"),
        (LeukemiaRecord(Path("/no/such.png"), "x", 0, None, "P1"), r"image file not found"),
    ],
)
def test_write_manifest_rejects_records_the_reader_would_reject(
    tmp_path: Path, record: LeukemiaRecord, match: str
) -> None:
    with pytest.raises(DataError, match=match):
        write_manifest([record], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_manifest_rejects_no_records_and_non_csv_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot write an empty manifest"):
        write_manifest([], tmp_path)
    record = LeukemiaRecord(_pixels(0), "x", 1, None, "P1")
    with pytest.raises(DataError, match=r"plain \.csv file name, got 'sub/m\.csv'"):
        write_manifest([record], tmp_path, name="sub/m.csv")


def test_failed_manifest_write_keeps_the_previous_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [LeukemiaRecord(_pixels(0), "first", 1, None, "P1")]
    manifest = write_manifest(records, tmp_path)
    previous = manifest.read_text()

    class FailingWriter:
        def __init__(self, stream: object, **kwargs: object) -> None:
            self.rows = 0

        def writerow(self, row: object) -> None:
            self.rows += 1
            if self.rows == 2:
                raise OSError("disk full")

    monkeypatch.setattr("fedvlm.tasks.leukemia.manifest.csv.writer", FailingWriter)
    with pytest.raises(OSError, match="disk full"):
        write_manifest([LeukemiaRecord(_pixels(1), "second", 0, None, "P1")], tmp_path)

    assert manifest.read_text() == previous
    assert not [path for path in tmp_path.rglob("*.tmp")]
