"""Interpretability scores of chest X-ray heatmaps against known lesions (FedVLM's pointing and mIoU).

FedVLM scores its Grad-CAM and grounding maps by how well they localise the finding they explain:

* **Pointing accuracy** (the pointing game of Zhang et al. 2016, "Top-down neural attention by
  excitation backprop"): a hit when the heatmap's maximum lies inside the finding's region. When
  several pixels share the maximum, the score is the share of them inside the region, so a
  constant heatmap scores the region's area fraction, the **chance** level of a uniformly random
  point.
* **mIoU**: the heatmap is binarised (:class:`HeatmapThreshold`: the top ``q`` of its pixels, or
  the pixels ``≥ t · max``) and compared with the region by intersection over union; the chance
  level of a mask of the same size placed at random is ``p·a / (p + a − p·a)`` (``p``, ``a`` the
  area fractions of the mask and the region, pixels drawn independently).

Regions come from pixel masks (the synthetic generator's ``lesion_mask``) or from boxes
(ChestX-ray14's ``BBox_List_2017.csv``, read into :class:`~fedvlm.tasks.cxr.records.LesionBox`).
Scores are computed per label and macro-averaged over labels (:class:`LocalizationScores`).

:func:`fedvlm.tasks.cxr.explain.explain_cxr_run` is the one entry point for a trained run: Grad-CAM and grounding
heatmaps of test images with known lesions, their scores, PNG overlays and an HTML index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from fedvlm.errors import ConfigError, DataError
from fedvlm.tasks.cxr.records import CxrRecord, LesionBox
from fedvlm.tasks.cxr.synthetic import SYNTH_CXR_FINDINGS

EXPLAIN_BATCH_SIZE = 16
SCORES_FILE = "scores.json"
INDEX_FILE = "index.html"
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

THRESHOLD_MODES = ("top", "relative")
PEAK_TOLERANCE = 1e-5
"""Heatmap values within this fraction of the map's largest magnitude below its maximum count as maxima."""


@dataclass(frozen=True)
class HeatmapThreshold:
    """How a heatmap is binarised before its IoU with a region.

    Attributes:
        mode: ``"top"``: the top ``value`` fraction of pixels (ties at the cut included);
            ``"relative"``: the pixels ``≥ value · max`` (for non-negative heatmaps, as Grad-CAM's).
        value: ``q`` in (0, 1] for ``top``, ``t`` in [0, 1] for ``relative``.

    Raises:
        ConfigError: For an unknown mode or a value out of range.
    """

    mode: str = "relative"
    value: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise ConfigError(f"heatmap threshold mode {self.mode!r} is not one of: {', '.join(THRESHOLD_MODES)}")
        low_open = self.mode == "top"
        if not ((self.value > 0.0) if low_open else (self.value >= 0.0)) or self.value > 1.0:
            bounds = "(0, 1]" if low_open else "[0, 1]"
            raise ConfigError(f"heatmap threshold value for mode={self.mode} must be in {bounds}, got {self.value}")

    def binarize(self, heatmap: np.ndarray) -> np.ndarray:
        """The boolean mask of the heatmap's selected pixels.

        Example:
            >>> HeatmapThreshold("top", 0.25).binarize(np.array([[4.0, 3.0], [2.0, 1.0]])).astype(int).tolist()
            [[1, 0], [0, 0]]
            >>> HeatmapThreshold("relative", 0.5).binarize(np.array([[4.0, 3.0], [2.0, 1.0]])).astype(int).tolist()
            [[1, 1], [1, 0]]
        """
        values = np.asarray(heatmap, dtype=np.float64)
        if self.mode == "top":
            count = max(1, int(np.ceil(self.value * values.size)))
            cut = np.partition(values.ravel(), values.size - count)[values.size - count]
            return values >= cut
        return values >= self.value * values.max()


def pointing_score(heatmap: np.ndarray, region: np.ndarray) -> float:
    """1 when the heatmap's maximum lies inside ``region``, else 0; the share inside for tied maxima
    (values within :data:`PEAK_TOLERANCE` · the map's largest magnitude below the maximum).

    Args:
        heatmap: ``H×W`` scores.
        region: ``H×W`` boolean mask of the finding.

    Raises:
        DataError: If the shapes differ.

    Example:
        >>> pointing_score(np.array([[0.0, 1.0], [0.5, 0.0]]), np.array([[False, True], [False, False]]))
        1.0
        >>> pointing_score(np.ones((2, 2)), np.array([[True, False], [False, False]]))  # a flat map: chance
        0.25
    """
    values, region = _same_shape(heatmap, region)
    # Values within float noise of the maximum tie (an upsampled flat map is not exactly flat).
    peaks = values >= values.max() - PEAK_TOLERANCE * np.abs(values).max()
    return float(region[peaks].mean())


def iou(prediction: np.ndarray, region: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty).

    Example:
        >>> iou(np.array([True, True, False]), np.array([False, True, True]))
        0.3333333333333333
    """
    prediction, region = _same_shape(prediction, region)
    prediction, region = prediction.astype(bool), region.astype(bool)
    union = int((prediction | region).sum())
    return 1.0 if union == 0 else float((prediction & region).sum() / union)


def chance_iou(predicted_fraction: float, region_fraction: float) -> float:
    """Expected IoU of a mask covering ``p`` of the image placed at random against a region covering
    ``a``: ``p·a / (p + a − p·a)`` (every pixel drawn independently).

    Example:
        >>> chance_iou(0.5, 0.5)
        0.3333333333333333
    """
    p, a = predicted_fraction, region_fraction
    union = p + a - p * a
    return 0.0 if union == 0 else p * a / union


def box_mask(box: LesionBox, shape: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """The pixels of an ``H×W`` image inside ``box`` (a pixel counts when its centre is inside).

    Args:
        box: The box, in the coordinates of the original image.
        shape: ``(H, W)`` of the mask.
        scale: ``(x, y)`` factors from the box's coordinates to the mask's.

    Example:
        >>> box_mask(LesionBox("Mass", 1.0, 0.0, 2.0, 1.0), (2, 4)).astype(int).tolist()
        [[0, 1, 1, 0], [0, 0, 0, 0]]
    """
    height, width = shape
    x0, x1 = box.x * scale[0], (box.x + box.width) * scale[0]
    y0, y1 = box.y * scale[1], (box.y + box.height) * scale[1]
    cols = np.arange(width) + 0.5
    rows = np.arange(height) + 0.5
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def label_regions(
    record: CxrRecord,
    label_names: Sequence[str],
    image_size: int,
    original_size: tuple[int, int] | None = None,
    mask_labels: Sequence[str] = SYNTH_CXR_FINDINGS,
) -> dict[str, np.ndarray]:
    """Each localised finding's region in a record, as an ``image_size × image_size`` boolean mask.

    A pixel mask (``lesion_mask``, value ``k + 1`` for ``mask_labels[k]``) is used when the record
    has one, resized with nearest neighbours; otherwise its boxes, scaled from the original image.

    Args:
        record: The record.
        label_names: Labels to look for (others are ignored).
        image_size: Side of the model's input.
        original_size: ``(width, height)`` of the original image, for boxes of file-backed records;
            defaults to the array's shape.
        mask_labels: Label of each ``lesion_mask`` value minus one.

    Returns:
        Label → non-empty region, for the labels of ``label_names`` the record localises.

    Raises:
        DataError: If a record with boxes has neither an image array nor ``original_size``.
    """
    wanted = set(label_names)
    regions: dict[str, np.ndarray] = {}
    if record.lesion_mask is not None:
        mask = record.lesion_mask
        if mask.shape != (image_size, image_size):
            resized = Image.fromarray(mask).resize((image_size, image_size), Image.Resampling.NEAREST)
            mask = np.asarray(resized)
        for value, label in enumerate(mask_labels, start=1):
            region = mask == value
            if label in wanted and region.any():
                regions[label] = region
        return regions
    if not record.boxes:
        return regions
    if original_size is None:
        if not isinstance(record.image, np.ndarray):
            raise DataError(f"{record.source or record.patient}: the original image size is needed to scale its boxes")
        original_size = (record.image.shape[1], record.image.shape[0])
    scale = (image_size / original_size[0], image_size / original_size[1])
    for box in record.boxes:
        if box.label in wanted:
            region = box_mask(box, (image_size, image_size), scale)
            if region.any():
                regions[box.label] = regions.get(box.label, np.zeros_like(region)) | region
    return regions


@dataclass
class LocalizationScores:
    """Accumulates pointing and IoU of heatmaps against regions, per label, with chance levels.

    Args:
        threshold: How heatmaps are binarised for IoU.

    Example:
        >>> scores = LocalizationScores(HeatmapThreshold("top", 0.25))
        >>> row = scores.add("Edema", np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[True, True], [False, False]]))
        >>> summary = scores.summary()
        >>> summary["pointing_accuracy"], summary["miou"], summary["chance_pointing_accuracy"]
        (1.0, 0.5, 0.5)
    """

    threshold: HeatmapThreshold = field(default_factory=HeatmapThreshold)
    _rows: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict, init=False)

    def add(self, label: str, heatmap: np.ndarray, region: np.ndarray) -> dict[str, float]:
        """Score one heatmap of ``label`` against its region.

        Returns:
            ``pointing``, ``iou``, ``region_fraction`` (the chance pointing level) and ``chance_iou``.
        """
        values, region = _same_shape(heatmap, region)
        prediction = self.threshold.binarize(values)
        row = {
            "pointing": pointing_score(values, region),
            "iou": iou(prediction, region),
            "region_fraction": float(region.mean()),
            "chance_iou": chance_iou(float(prediction.mean()), float(region.mean())),
        }
        self._rows.setdefault(label, []).append(tuple(row.values()))  # type: ignore[arg-type]
        return row

    def summary(self) -> dict[str, Any]:
        """Macro averages over labels and the per-label means.

        Returns:
            ``pointing_accuracy``, ``miou``, ``chance_pointing_accuracy``, ``chance_miou`` (means of
            the per-label means), ``num_heatmaps``, and ``per_label``: label → the same keys plus
            ``count``. Means are ``nan`` when nothing was added.
        """
        per_label: dict[str, dict[str, float | int]] = {}
        for label, rows in self._rows.items():
            table = np.asarray(rows, dtype=np.float64)
            means = table.mean(axis=0)
            per_label[label] = {
                "pointing_accuracy": float(means[0]),
                "miou": float(means[1]),
                "chance_pointing_accuracy": float(means[2]),
                "chance_miou": float(means[3]),
                "count": len(rows),
            }
        keys = ("pointing_accuracy", "miou", "chance_pointing_accuracy", "chance_miou")
        summary: dict[str, Any] = {key: _mean(float(row[key]) for row in per_label.values()) for key in keys}
        summary["num_heatmaps"] = sum(len(rows) for rows in self._rows.values())
        summary["per_label"] = per_label
        return summary


def _mean(values: Iterable[float]) -> float:
    listed = list(values)
    return float(np.mean(listed)) if listed else float("nan")


def _same_shape(heatmap: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, mask = np.asarray(heatmap, dtype=np.float64), np.asarray(region).astype(bool)
    if values.shape != mask.shape:
        raise DataError(f"heatmap of shape {values.shape} does not match the region's {mask.shape}")
    return values, mask


# --- The run-level entry point -----------------------------------------------------------------
