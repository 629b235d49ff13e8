"""Tests of the on-disk layouts (ALL-IDB1, ALL-IDB2, C-NMC 2019, manifest), built in fixtures
with the real file and folder names, and of the reports join and format detection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedvlm.errors import DataError
from fedvlm.tasks.leukemia.layouts import (
    detect_format,
    leukemia_formats,
    load_leukemia,
    parse_all_idb_name,
    parse_cnmc_name,
)
from fedvlm.tasks.leukemia.records import LeukemiaRecord

VALID_FORMATS = "all_idb1, all_idb2, cnmc, manifest"


def _write_image(path: Path, value: int = 120) -> Path:
    """An 8×8 image in the format its suffix names (JPEG, TIFF, BMP, PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _file_name(record: LeukemiaRecord) -> str:
    assert isinstance(record.image, Path)  # folder layouts hold paths, never arrays
    return record.image.name


def make_all_idb1(root: Path) -> Path:
    """The official ALL-IDB1 layout: ``im/`` images and ``xyc/`` blast centres."""
    for name in ("Im001_1", "Im002_1", "Im003_0"):
        _write_image(root / "im" / f"{name}.jpg")
    _write_text(root / "xyc" / "Im001_1.xyc", "10\t20\n30 40.5\n")
    _write_text(root / "xyc" / "Im003_0.xyc", "")  # real healthy images ship empty files
    return root


def make_all_idb2(root: Path) -> Path:
    """The official ALL-IDB2 layout: single-cell TIFF crops in ``img/``."""
    for name in ("Im002_0", "Im001_1"):
        _write_image(root / "img" / f"{name}.tif")
    return root


def make_cnmc(root: Path) -> Path:
    """C-NMC 2019 training data under its ``C-NMC_training_data`` wrapper folder."""
    base = root / "C-NMC_training_data"
    _write_image(base / "fold_0" / "all" / "UID_11_10_1_all.bmp")
    _write_image(base / "fold_1" / "all" / "UID_11_12_2_all.bmp")
    _write_image(base / "fold_0" / "hem" / "UID_H10_43_1_hem.bmp")
    _write_image(base / "fold_2" / "hem" / "UID_H22_31_15_hem.bmp")
    return root


def make_manifest(root: Path) -> Path:
    _write_image(root / "smears" / "s1.png")
    _write_text(root / "manifest.csv", "image,report,leukemia,stage\nsmears/s1.png,pallor,1,I\n")
    return root


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "all_idb1": make_all_idb1,
    "all_idb2": make_all_idb2,
    "cnmc": make_cnmc,
    "manifest": make_manifest,
}


def test_every_registered_format_has_a_fixture() -> None:
    assert sorted(LAYOUTS) == leukemia_formats.names()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_is_detected_and_loads_like_its_explicit_format(tmp_path: Path, name: str) -> None:
    root = LAYOUTS[name](tmp_path / name)

    assert detect_format(root) == name
    auto = load_leukemia("auto", root)
    assert auto == load_leukemia(name, root)
    assert auto == sorted(auto, key=lambda record: record.image)


def test_manifest_file_itself_is_detected(tmp_path: Path) -> None:
    root = make_manifest(tmp_path)

    assert detect_format(root / "manifest.csv") == "manifest"
    (record,) = load_leukemia("auto", root / "manifest.csv")
    assert (record.leukemia, record.stage, record.report) == (1, 0, "pallor")


def test_all_idb1_labels_patients_and_blast_points(tmp_path: Path) -> None:
    root = make_all_idb1(tmp_path)

    records = load_leukemia("all_idb1", root)

    assert [r.image for r in records] == [root / "im" / f"{name}.jpg" for name in ("Im001_1", "Im002_1", "Im003_0")]
    assert [r.leukemia for r in records] == [1, 1, 0]
    assert [r.patient for r in records] == ["Im001", "Im002", "Im003"]
    assert [r.blast_points for r in records] == [((10.0, 20.0), (30.0, 40.5)), (), ()]
    assert all(r.stage is None and r.report == "" and r.site is None for r in records)


def test_all_idb1_flattened_into_one_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "Im005_1.jpg")
    _write_text(tmp_path / "Im005_1.xyc", "7 8\n")

    assert detect_format(tmp_path) == "all_idb1"
    (record,) = load_leukemia("all_idb1", tmp_path)
    assert (record.patient, record.leukemia, record.blast_points) == ("Im005", 1, ((7.0, 8.0),))


def test_all_idb2_labels_from_names_sorted_by_path(tmp_path: Path) -> None:
    root = make_all_idb2(tmp_path)

    records = load_leukemia("all_idb2", root)

    assert [(_file_name(r), r.leukemia, r.patient) for r in records] == [
        ("Im001_1.tif", 1, "Im001"),
        ("Im002_0.tif", 0, "Im002"),
    ]


def test_cnmc_patients_are_subjects_and_labels_come_from_class_folders(tmp_path: Path) -> None:
    root = make_cnmc(tmp_path)

    records = load_leukemia("cnmc", root)

    by_name = {_file_name(r): r for r in records}
    assert {name: (r.leukemia, r.patient) for name, r in by_name.items()} == {
        "UID_11_10_1_all.bmp": (1, "11"),
        "UID_11_12_2_all.bmp": (1, "11"),
        "UID_H10_43_1_hem.bmp": (0, "H10"),
        "UID_H22_31_15_hem.bmp": (0, "H22"),
    }
    assert all(r.site is None for r in records)  # folds are CV folds, not sites


def test_cnmc_without_the_wrapper_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "fold_0" / "all" / "UID_3_1_1_all.bmp")

    assert detect_format(tmp_path) == "cnmc"
    assert [r.patient for r in load_leukemia("cnmc", tmp_path)] == ["3"]


def test_name_parsers() -> None:
    assert parse_all_idb_name("Im108_0.tif") == ("Im108", 0)
    assert parse_cnmc_name("UID_H22_31_15_hem.bmp") == ("H22", 0)
    with pytest.raises(DataError, match=r"'Im001_2\.jpg' is not an ALL-IDB image name"):
        parse_all_idb_name("Im001_2.jpg")
    with pytest.raises(DataError, match=r"'cell_11\.bmp' is not a C-NMC image name"):
        parse_cnmc_name("cell_11.bmp")


def test_reports_join_by_file_name_or_stem(tmp_path: Path) -> None:
    root = make_all_idb1(tmp_path / "data")
    reports = _write_text(
        tmp_path / "reports.csv",
        "image,report,stage\nIm001_1.jpg,blasts 60%,III\nIm002_1,blasts 20%,\nIm003_0.jpg,normal count,\n",
    )

    records = load_leukemia("all_idb1", root, reports=reports)

    assert [(r.report, r.stage) for r in records] == [
        ("blasts 60%", 2),
        ("blasts 20%", None),
        ("normal count", None),
    ]
    assert [r.source for r in records] == ["reports.csv:2", "reports.csv:3", "reports.csv:4"]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("Im001_1.jpg,a,\nIm002_1.jpg,b,\n", r"no report row in .*reports\.csv for image .*Im003_0\.jpg"),
        (
            "Im001_1.jpg,a,\nIm002_1.jpg,b,\nIm003_0.jpg,c,\nIm009_1.jpg,d,\n",
            r"reports\.csv:5: column 'image': no image named 'Im009_1\.jpg'",
        ),
        ("Im001_1.jpg,a,\nIm002_1.jpg, ,\nIm003_0.jpg,c,\n", r"reports\.csv:3: column 'report' is empty"),
        (
            "Im001_1.jpg,a,\nIm001_1,again,\nIm002_1.jpg,b,\nIm003_0.jpg,c,\n",
            r"reports\.csv:3: a second report for Im001_1\.jpg \(first at reports\.csv:2\)",
        ),
        (
            "Im001_1.jpg,a,\nIm002_1.jpg,b,\nIm003_0.jpg,c,II\n",
            r"reports\.csv:4: a stage is given for Im003_0\.jpg, whose name marks it healthy",
        ),
        (
            "Im001_1.jpg,a,9\nIm002_1.jpg,b,\nIm003_0.jpg,c,\n",
            r"reports\.csv:2: column 'stage': stage '9' is out of range 1\.\.4",
        ),
    ],
)
def test_bad_reports_join_names_the_row_or_image(tmp_path: Path, rows: str, match: str) -> None:
    root = make_all_idb1(tmp_path / "data")
    reports = _write_text(tmp_path / "reports.csv", "image,report,stage\n" + rows)

    with pytest.raises(DataError, match=match):
        load_leukemia("all_idb1", root, reports=reports)


def test_reports_file_missing_or_without_report_column(tmp_path: Path) -> None:
    root = make_cnmc(tmp_path / "data")

    with pytest.raises(DataError, match=r"reports file not found: .*absent\.csv"):
        load_leukemia("cnmc", root, reports=tmp_path / "absent.csv")
    reports = _write_text(tmp_path / "reports.csv", "image,text\nUID_11_10_1_all.bmp,x\n")
    with pytest.raises(DataError, match=r"reports\.csv:1: missing required column\(s\) 'report'"):
        load_leukemia("cnmc", root, reports=reports)


def test_unknown_layout_lists_what_was_looked_for_and_valid_names(tmp_path: Path) -> None:
    _write_image(tmp_path / "photo.jpg")

    with pytest.raises(DataError, match=rf"ImNNN_Y\.jpg in im/.*one of: {VALID_FORMATS}$"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match=r"data root not found: .*absent"):
        detect_format(tmp_path / "absent")


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    unknown = rf"unknown data\.format 'allidb'; valid names: {VALID_FORMATS}$"
    with pytest.raises(DataError, match=unknown):
        load_leukemia("allidb", tmp_path)
    with pytest.raises(DataError, match=r"data root not found: .*absent"):
        load_leukemia("all_idb1", tmp_path / "absent")


@pytest.mark.parametrize(
    ("files", "format_name", "match"),
    [
        ({"im/notes.txt": ""}, "all_idb1", r"no ALL-IDB1 ImNNN_Y\.jpg images in .*im"),
        ({"img/readme.md": ""}, "all_idb2", r"no ALL-IDB2 ImNNN_Y\.tif images in .*img"),
        ({"fold_0/all/readme.txt": ""}, "cnmc", r"no C-NMC \.bmp images in the all/hem folders"),
        ({"fold_0/other/x.txt": ""}, "cnmc", r"no C-NMC fold_k folders in"),
        ({"im/Im001.jpg": None}, "all_idb1", r"im/Im001\.jpg: 'Im001\.jpg' is not an ALL-IDB"),
        (
            {"im/Im001_1.jpg": None, "xyc/Im001_1.xyc": "5 6\n7\n"},
            "all_idb1",
            r"Im001_1\.xyc:2: expected a blast centre 'x y', got '7'",
        ),
        (
            {"im/Im001_1.jpg": None, "xyc/Im002_1.xyc": "5 6\n"},
            "all_idb1",
            r"blast-centre file .*Im002_1\.xyc has no image Im002_1\.jpg",
        ),
        (
            {"fold_0/hem/UID_4_1_1_all.bmp": None},
            "cnmc",
            r"UID_4_1_1_all\.bmp: the name's class disagrees with its folder",
        ),
        (
            {"manifest.csv": "x", "manifest.jsonl": "x"},
            "manifest",
            r"has both manifest\.csv and manifest\.jsonl; keep one",
        ),
        ({"notes.txt": ""}, "manifest", r"has neither manifest\.csv nor manifest\.jsonl"),
    ],
)
def test_bad_layout_raises_naming_the_file_or_folder(
    tmp_path: Path, files: dict[str, str | None], format_name: str, match: str
) -> None:
    for relative, text in files.items():
        if text is None:
            _write_image(tmp_path / relative)
        else:
            _write_text(tmp_path / relative, text)

    with pytest.raises(DataError, match=match):
        load_leukemia(format_name, tmp_path)


def test_manifest_format_refuses_a_separate_reports_file(tmp_path: Path) -> None:
    root = make_manifest(tmp_path)

    with pytest.raises(DataError, match=r"a manifest carries its own reports"):
        load_leukemia("manifest", root, reports=tmp_path / "reports.csv")
