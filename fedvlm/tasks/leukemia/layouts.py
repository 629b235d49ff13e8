"""Loaders for the public leukemia data sets, each in its published folder layout.

============ ==============================================================================
``manifest`` a :mod:`~fedvlm.tasks.leukemia.manifest` file, or a folder holding ``manifest.csv|jsonl``
``all_idb1`` ALL-IDB1: ``im/ImNNN_Y.jpg`` (``Y`` = 1 blasts present, 0 healthy) and blast
             centres in ``xyc/ImNNN_Y.xyc``; both folders may also be flattened into the root
``all_idb2`` ALL-IDB2: ``img/ImNNN_Y.tif`` (``Y`` = 1 blast cell, 0 healthy), or flattened
``cnmc``     C-NMC 2019 (ISBI 2019 ALL challenge) training data:
             ``fold_k/all/*.bmp`` (leukemia) and ``fold_k/hem/*.bmp`` (healthy), optionally
             under ``C-NMC_training_data/``; the subject id in ``UID_<subject>_…`` is the patient
============ ==============================================================================

The image-only layouts take an optional reports CSV (columns ``image`` = file name,
``report``, optional ``stage``) joined by file name; every image must have exactly one row and
every row must name an image. Records come back sorted by image path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedvlm.data.tables import read_table
from fedvlm.errors import DataError
from fedvlm.registry import Registry
from fedvlm.tasks.leukemia.manifest import MANIFEST_NAMES, read_manifest
from fedvlm.tasks.leukemia.records import NUM_STAGES_DEFAULT, LeukemiaRecord, parse_stage

#: Layout name → loader ``(root, reports, num_stages) -> list[LeukemiaRecord]``.
leukemia_formats: Registry[list[LeukemiaRecord]] = Registry("data.format")

ALL_IDB1_SUFFIXES = frozenset({".jpg"})
ALL_IDB2_SUFFIXES = frozenset({".tif", ".tiff"})
CNMC_SUFFIXES = frozenset({".bmp"})
CNMC_WRAPPER = "C-NMC_training_data"
REPORT_COLUMNS = ("image", "report")

_ALL_IDB_NAME = re.compile(r"(Im\d+)_([01])")
_CNMC_NAME = re.compile(r"UID_([A-Za-z]*\d+)_.+_(all|hem)", re.IGNORECASE)
_CNMC_FOLD = re.compile(r"fold_\d+")
_CNMC_CLASSES = {"all": 1, "hem": 0}


@dataclass(frozen=True)
class _LabelledImage:
    """An image found in a layout, before its report is joined."""

    path: Path
    leukemia: int
    patient: str
    blast_points: tuple[tuple[float, float], ...] = ()


def parse_all_idb_name(file_name: str) -> tuple[str, int]:
    """Split an ALL-IDB file name ``ImNNN_Y.<ext>`` into its image id and label.

    Args:
        file_name: A file name such as ``"Im006_1.jpg"`` (the extension is ignored).

    Returns:
        ``(image id, label)``; the id doubles as the patient, since ALL-IDB links no patients.

    Raises:
        DataError: When the name does not follow ``ImNNN_Y`` with ``Y`` in {0, 1}.

    Example:
        >>> parse_all_idb_name("Im006_1.jpg")
        ('Im006', 1)
    """
    match = _ALL_IDB_NAME.fullmatch(Path(file_name).stem)
    if match is None:
        raise DataError(f"{file_name!r} is not an ALL-IDB image name ImNNN_Y (Y = 1 leukemia, 0 healthy)")
    return match.group(1), int(match.group(2))


def parse_cnmc_name(file_name: str) -> tuple[str, int]:
    """Split a C-NMC 2019 file name ``UID_<subject>_<image>_<cell>_<all|hem>.bmp``.

    Args:
        file_name: A file name such as ``"UID_H10_43_1_hem.bmp"``.

    Returns:
        ``(subject id, label)``: the second ``_`` field (``"H10"``) and 1 for ``all``, 0 for
        ``hem``.

    Raises:
        DataError: When the name does not follow the C-NMC pattern.

    Example:
        >>> parse_cnmc_name("UID_11_10_1_all.bmp"), parse_cnmc_name("UID_H10_43_1_hem.bmp")
        (('11', 1), ('H10', 0))
    """
    match = _CNMC_NAME.fullmatch(Path(file_name).stem)
    if match is None:
        raise DataError(f"{file_name!r} is not a C-NMC image name UID_<subject>_..._<all|hem>")
    return match.group(1), _CNMC_CLASSES[match.group(2).lower()]


def read_blast_points(path: Path) -> tuple[tuple[float, float], ...]:
    """Read an ALL-IDB1 ``.xyc`` file: one whitespace-separated ``x y`` blast centre per line.

    Args:
        path: The ``.xyc`` file; an empty file (healthy images) gives no points.

    Returns:
        The blast centres ``(x, y)`` in pixels, in file order.

    Raises:
        DataError: Naming the file and line when a line is not two numbers.
    """
    points: list[tuple[float, float]] = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            x, y = (float(field) for field in fields)
        except ValueError:
            raise DataError(f"{path}:{line_number}: expected a blast centre 'x y', got {line.strip()!r}") from None
        points.append((x, y))
    return tuple(points)


@leukemia_formats.register("manifest")
def load_manifest_layout(root: Path, reports: Path | None, num_stages: int) -> list[LeukemiaRecord]:
    """Load a manifest file, or the ``manifest.csv``/``manifest.jsonl`` inside a folder.

    Raises:
        DataError: When a reports file is given (a manifest carries its own reports), when
            a folder holds no manifest or both, or when the manifest is invalid.
    """
    if reports is not None:
        raise DataError(
            f"a manifest carries its own reports; drop the reports file {reports} or merge it into the manifest"
        )
    if root.is_file():
        return read_manifest(root, num_stages)
    found = [root / name for name in MANIFEST_NAMES if (root / name).is_file()]
    if not found:
        raise DataError(f"{root} has neither {' nor '.join(MANIFEST_NAMES)}")
    if len(found) > 1:
        raise DataError(f"{root} has both {' and '.join(MANIFEST_NAMES)}; keep one")
    return read_manifest(found[0], num_stages)


@leukemia_formats.register("all_idb1")
def load_all_idb1(root: Path, reports: Path | None, num_stages: int) -> list[LeukemiaRecord]:
    """Load ALL-IDB1: ``ImNNN_Y.jpg`` in ``root/im`` (or ``root``), blasts from ``.xyc`` files.

    The ``.xyc`` files are read from ``root/xyc`` when it exists, else beside the images; an
    image without one has unknown (empty) blast points.

    Raises:
        DataError: On a misnamed image, an unreadable ``.xyc`` line, a ``.xyc`` file with no
            image, no images, or a reports-join problem.
    """
    image_dir = _layout_folder(root, "im")
    image_paths = _list_files(image_dir, ALL_IDB1_SUFFIXES, "ALL-IDB1 ImNNN_Y.jpg")
    xyc_dir = root / "xyc" if (root / "xyc").is_dir() else image_dir
    xyc_paths = {path.stem: path for path in _list_files(xyc_dir, frozenset({".xyc"}))}
    orphans = sorted(set(xyc_paths) - {path.stem for path in image_paths})
    if orphans:
        raise DataError(f"blast-centre file {xyc_paths[orphans[0]]} has no image {orphans[0]}.jpg in {image_dir}")
    images = []
    for path in image_paths:
        patient, leukemia = _parse_in_folder(parse_all_idb_name, path)
        xyc_path = xyc_paths.get(path.stem)
        points = read_blast_points(xyc_path) if xyc_path is not None else ()
        images.append(_LabelledImage(path, leukemia, patient, points))
    return _attach_reports(images, reports, num_stages)


@leukemia_formats.register("all_idb2")
def load_all_idb2(root: Path, reports: Path | None, num_stages: int) -> list[LeukemiaRecord]:
    """Load ALL-IDB2: single-cell crops ``ImNNN_Y.tif`` in ``root/img`` (or ``root``).

    Raises:
        DataError: On a misnamed image, no images, or a reports-join problem.
    """
    image_dir = _layout_folder(root, "img")
    images = []
    for path in _list_files(image_dir, ALL_IDB2_SUFFIXES, "ALL-IDB2 ImNNN_Y.tif"):
        patient, leukemia = _parse_in_folder(parse_all_idb_name, path)
        images.append(_LabelledImage(path, leukemia, patient))
    return _attach_reports(images, reports, num_stages)


@leukemia_formats.register("cnmc")
def load_cnmc(root: Path, reports: Path | None, num_stages: int) -> list[LeukemiaRecord]:
    """Load the C-NMC 2019 training folds: ``fold_k/{all,hem}/*.bmp``.

    The class folder gives the label and must agree with the ``_all``/``_hem`` name suffix.
    The folds are cross-validation folds, not sites, so ``site`` is ``None``.

    Raises:
        DataError: When no ``fold_k`` folder exists, a fold has neither ``all`` nor ``hem``,
            a name is misformed or disagrees with its folder, there are no images, or on a
            reports-join problem.
    """
    folds = _cnmc_folds(root)
    if not folds:
        raise DataError(f"no C-NMC fold_k folders in {root} or {root / CNMC_WRAPPER}")
    images = []
    for fold in folds:
        class_dirs = [fold / name for name in _CNMC_CLASSES if (fold / name).is_dir()]
        if not class_dirs:
            raise DataError(f"C-NMC fold {fold} has neither an 'all' nor a 'hem' folder")
        for class_dir in class_dirs:
            for path in _list_files(class_dir, CNMC_SUFFIXES):
                patient, leukemia = _parse_in_folder(parse_cnmc_name, path)
                if leukemia != _CNMC_CLASSES[class_dir.name]:
                    raise DataError(f"{path}: the name's class disagrees with its folder")
                images.append(_LabelledImage(path, leukemia, patient))
    if not images:
        raise DataError(f"no C-NMC .bmp images in the all/hem folders of {root}")
    return _attach_reports(images, reports, num_stages)


def detect_format(root: Path) -> str:
    """Recognise which registered layout ``root`` holds.

    Args:
        root: A manifest file or a data folder.

    Returns:
        A name in :data:`leukemia_formats`.

    Raises:
        DataError: When ``root`` is missing, or matches no layout (listing what was looked for
            and the valid ``data.format=`` names).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root not found: {root}")
    if root.is_file():
        if root.suffix.lower() in {".csv", ".jsonl"}:
            return "manifest"
    elif any((root / name).is_file() for name in MANIFEST_NAMES):
        return "manifest"
    elif _has_all_idb_images(root, "im", ALL_IDB1_SUFFIXES):
        return "all_idb1"
    elif _has_all_idb_images(root, "img", ALL_IDB2_SUFFIXES):
        return "all_idb2"
    elif _cnmc_folds(root):
        return "cnmc"
    raise DataError(
        f"cannot recognise the data layout of {root}: looked for "
        f"{' or '.join(MANIFEST_NAMES)} (manifest), ImNNN_Y.jpg in im/ or the folder "
        f"(all_idb1), ImNNN_Y.tif in img/ or the folder (all_idb2), fold_k/all and "
        f"fold_k/hem (cnmc); set data.format= to one of: {', '.join(leukemia_formats.names())}"
    )


def load_leukemia(
    format: str,
    root: Path,
    reports: Path | None = None,
    num_stages: int = NUM_STAGES_DEFAULT,
) -> list[LeukemiaRecord]:
    """Load a leukemia data source in a registered layout.

    Args:
        format: A name in :data:`leukemia_formats`, or ``"auto"`` to :func:`detect_format`.
        root: The data folder (or manifest file).
        reports: Optional reports CSV for the image-only layouts (``image``, ``report``,
            optional ``stage``); without it reports are empty.
        num_stages: Number of clinical stages ``K``.

    Returns:
        The records, sorted by image path for the folder layouts.

    Raises:
        DataError: When the format is unknown (listing the valid ones), ``root`` is missing,
            or the data are invalid.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root not found: {root}")
    if format == "auto":
        format = detect_format(root)
    try:
        loader = leukemia_formats.get(format)
    except KeyError as error:
        raise DataError(error.args[0]) from None
    return loader(root, None if reports is None else Path(reports), num_stages)


def _layout_folder(root: Path, official: str) -> Path:
    """The layout's official image folder when present, else the root itself."""
    return root / official if (root / official).is_dir() else root


def _list_files(folder: Path, suffixes: frozenset[str], required: str | None = None) -> list[Path]:
    """Files in ``folder`` with one of ``suffixes`` (any case), sorted; at least one when
    ``required`` names what was expected."""
    paths = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in suffixes)
    if required is not None and not paths:
        raise DataError(f"no {required} images in {folder}")
    return paths


def _parse_in_folder(parse_name: Callable[[str], tuple[str, int]], path: Path) -> tuple[str, int]:
    """``parse_name(path.name)``, with the full path in the error message."""
    try:
        return parse_name(path.name)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def _has_all_idb_images(root: Path, official: str, suffixes: frozenset[str]) -> bool:
    """Whether the official folder (or root) holds an ``ImNNN_Y`` image with ``suffixes``."""
    return any(
        path.is_file() and path.suffix.lower() in suffixes and _ALL_IDB_NAME.fullmatch(path.stem) is not None
        for folder in {root / official, root}
        if folder.is_dir()
        for path in folder.iterdir()
    )


def _cnmc_folds(root: Path) -> list[Path]:
    """The ``fold_k`` folders (with an ``all`` or ``hem`` inside) of ``root`` or its wrapper."""
    base = root / CNMC_WRAPPER if (root / CNMC_WRAPPER).is_dir() else root
    return sorted(
        path
        for path in base.iterdir()
        if path.is_dir() and _CNMC_FOLD.fullmatch(path.name) and any((path / name).is_dir() for name in _CNMC_CLASSES)
    )


def _attach_reports(images: Sequence[_LabelledImage], reports: Path | None, num_stages: int) -> list[LeukemiaRecord]:
    """Build records, joining each image to its row in the ``reports`` CSV when given."""
    images = sorted(images, key=lambda image: image.path)
    report_by_path: dict[Path, tuple[str, int | None, str]] = {}
    if reports is not None:
        report_by_path = _read_reports(images, reports, num_stages)
    records = []
    for image in images:
        report, stage, source = report_by_path.get(image.path, ("", None, str(image.path)))
        if stage is not None and image.leukemia == 0:
            raise DataError(
                f"{source}: a stage is given for {image.path.name}, whose name marks it healthy (leukemia=0)"
            )
        record = LeukemiaRecord(
            image=image.path,
            report=report,
            leukemia=image.leukemia,
            stage=stage,
            patient=image.patient,
            source=source,
            blast_points=image.blast_points,
        )
        record.validate(num_stages)
        records.append(record)
    return records


def _read_reports(
    images: Sequence[_LabelledImage], reports: Path, num_stages: int
) -> dict[Path, tuple[str, int | None, str]]:
    """Image path → ``(report, stage, source)`` from the reports CSV, checking a 1:1 join."""
    by_key: dict[str, Path] = {}
    for image in images:
        for key in (image.path.name, image.path.stem):
            if key in by_key and by_key[key] != image.path:
                raise DataError(
                    f"{by_key[key]} and {image.path} share the name {key!r}; the reports "
                    f"file {reports} cannot tell them apart"
                )
            by_key[key] = image.path
    joined: dict[Path, tuple[str, int | None, str]] = {}
    for row in read_table(reports, REPORT_COLUMNS, kind="reports file"):
        where = f"{reports}:{row.line}"
        name = row.text("image").strip()
        path = by_key.get(name)
        if path is None:
            raise DataError(f"{where}: column 'image': no image named {name!r} in the data folder")
        if path in joined:
            raise DataError(f"{where}: a second report for {path.name} (first at {joined[path][2]})")
        report = row.text("report")
        if not report.strip():
            raise DataError(f"{where}: column 'report' is empty")
        stage = parse_stage(row.text("stage"), num_stages, f"{where}: column 'stage'")
        joined[path] = (report, stage, f"{reports.name}:{row.line}")
    unreported = [image.path for image in images if image.path not in joined]
    if unreported:
        shown = ", ".join(str(path) for path in unreported[:3])
        more = f" and {len(unreported) - 3} more" if len(unreported) > 3 else ""
        raise DataError(f"no report row in {reports} for image {shown}{more}")
    return joined
