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
(ChestX-ray14's ``BBox_List_2017.csv``, read into :class:`~fedvlm.data.cxr_records.LesionBox`).
Scores are computed per label and macro-averaged over labels (:class:`LocalizationScores`).

:func:`explain_cxr_run` is the one entry point for a trained run: Grad-CAM and grounding
heatmaps of test images with known lesions, their scores, PNG overlays and an HTML index.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedvlm.config import CONFIG_FILE_NAME, load_config
from fedvlm.data.cxr_records import CxrRecord, LesionBox
from fedvlm.data.prepared import make_loader, prepare_cxr_bundle, subset
from fedvlm.data.synthetic_cxr import SYNTH_CXR_FINDINGS
from fedvlm.errors import ConfigError, DataError
from fedvlm.evaluate import load_trained_module
from fedvlm.explain.render import _page, save_heatmap_png
from fedvlm.models.contrastive import ContrastiveVLM
from fedvlm.runs import jsonable
from fedvlm.tasks import get_task
from fedvlm.tasks.cxr import load_dataset, load_run_tokenizer

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


def explain_cxr_run(
    run_dir: Path | str,
    num_images: int,
    out_dir: Path | str,
    threshold: HeatmapThreshold | None = None,
    checkpoint: str = "last",
) -> dict[str, Any]:
    """Explain a trained chest X-ray run on test images with known lesions, and score the heatmaps.

    Prepared bundles carry no lesions, so the records are read again from the run's config
    (:func:`fedvlm.tasks.cxr.load_dataset`; the synthetic generator is deterministic in
    ``seed``) and matched to the test split by the bundle's ``index``; their images are checked
    against the prepared ones. The first ``num_images`` test images (in test order) with a mask or
    box of one of the run's labels are explained:

    * Grad-CAM of each localised label's logit (:mod:`fedvlm.explain.gradcam`);
    * for a vision-language model, the grounding heatmap of each finding's report phrase
      (:mod:`fedvlm.explain.grounding`).

    Args:
        run_dir: A run directory written by ``fedvlm fit`` (task ``cxr``).
        num_images: How many test images to explain (fewer when fewer have lesions).
        out_dir: Where ``scores.json``, ``index.html`` and ``images/*.png`` go (created).
        threshold: Binarisation for mIoU (default: ``≥ 0.5 · max``); grounding heatmaps are
            min–max scaled to [0, 1] first.
        checkpoint: ``last`` or ``best``.

    Returns:
        The aggregate scores: ``gradcam`` (:meth:`LocalizationScores.summary`: pointing accuracy,
        mIoU per label and mean, their chance levels), ``grounding`` (the same for phrase heatmaps
        plus :class:`~fedvlm.explain.grounding.TextAlignmentScores` and ``phrase_image_ranking``;
        None for an image-only model), ``num_images``, ``threshold``, ``gradcam_layer`` and
        ``grounding_grid`` (the region grid; a 1×1 grid cannot localise and scores chance).

    Raises:
        ConfigError: For a run that is not a chest X-ray run, a text-only model or a missing
            checkpoint.
        DataError: When no test image has a lesion mask or box, or the regenerated records do
            not match the prepared test images.
    """
    from fedvlm.explain.gradcam import cxr_grad_cam, label_logits, target_layer  # import cycle: they use this module
    from fedvlm.explain.grounding import (
        TextAlignmentScores,
        phrase_embeddings,
        phrase_heatmaps,
        phrase_image_ranking,
        region_embeddings,
    )

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if num_images < 1:
        raise ConfigError(f"num_images must be >= 1, got {num_images}")
    threshold = threshold or HeatmapThreshold()
    cfg = load_config(run_dir / CONFIG_FILE_NAME)
    if cfg.task != "cxr":
        raise ConfigError(f"CXR explanations need a task=cxr run; {run_dir} is task={cfg.task}")
    module = load_trained_module(run_dir, cfg, checkpoint)
    assert isinstance(module, ContrastiveVLM)
    if module.image_encoder is None:
        raise ConfigError("CXR explanations need an image tower; this run is text-only (model.modality=text)")
    fused = module.modality == "fused"
    names = module.label_names
    size = int(cfg.data.image_size)
    test = get_task("cxr").load_test(run_dir)
    records = load_dataset(cfg).records
    rows, chosen, regions = [], [], []
    for row, index in enumerate(test["index"].tolist()):
        if index >= len(records):
            raise DataError(f"test index {index} is beyond the {len(records)} regenerated records of {run_dir}")
        record = records[index]
        found = label_regions(record, names, size, original_size=_original_size(record))
        if found:
            rows.append(row)
            chosen.append(record)
            regions.append(found)
        if len(rows) == num_images:
            break
    if not rows:
        raise DataError(
            f"no test image of {run_dir} has a lesion mask or box for labels {', '.join(names)}; "
            "localisation scores need the synthetic generator's masks or ChestX-ray14's BBox_List_2017.csv boxes"
        )
    bundle = subset(test, rows)
    if not torch.equal(prepare_cxr_bundle(chosen, None, size, 1, equalize=cfg.data.equalize)["image"], bundle["image"]):
        raise DataError(
            f"the records regenerated from {run_dir / CONFIG_FILE_NAME} do not match the prepared test images "
            "(was the data source changed after the run was prepared?)"
        )

    localized = [name for name in names if any(name in found for found in regions)]
    gradcam_scores = LocalizationScores(threshold)
    grounding_scores = LocalizationScores(threshold)
    alignment = TextAlignmentScores()
    tokenizer = load_run_tokenizer(run_dir) if fused else None
    device = module.device
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    pages: list[dict[str, Any]] = []
    phrase_rows: list[torch.Tensor] = []
    phrase_owner: list[int] = []
    phrase_labels: list[str] = []
    image_embeddings: list[torch.Tensor] = []
    position = 0
    for batch in make_loader(bundle, EXPLAIN_BATCH_SIZE, shuffle=False):
        images = batch["image"].to(device)
        maps = cxr_grad_cam(module, images, localized).cpu().numpy()
        with torch.no_grad():
            probabilities = torch.sigmoid(label_logits(module, images)).cpu().numpy()
            if fused:
                image_embeddings.append(module.embed_images(images).cpu())
        for offset in range(images.shape[0]):
            k = position + offset
            record, found = chosen[k], regions[k]
            stem = f"{k:03d}_" + (_UNSAFE_FILE_CHARS.sub("_", record.study or record.patient).strip("._") or "image")
            pixels = np.repeat(bundle["image"][k, 0].numpy()[..., None], 3, axis=2)
            Image.fromarray(pixels).save(image_dir / f"{stem}.png")
            page: dict[str, Any] = {
                "study": record.study or record.patient,
                "site": record.site,
                "image": f"images/{stem}.png",
                "findings": {},
                "source": record.source,
            }
            for label, region in found.items():
                heatmap = maps[offset, localized.index(label)]
                slug = _UNSAFE_FILE_CHARS.sub("_", label)
                entry: dict[str, Any] = {
                    "probability": float(probabilities[offset, names.index(label)]),
                    "gradcam": gradcam_scores.add(label, heatmap, region),
                    "gradcam_png": _overlay(pixels, heatmap, image_dir / f"{stem}_gradcam_{slug}.png"),
                    "lesion_png": _overlay(pixels, region.astype(np.float64), image_dir / f"{stem}_lesion_{slug}.png"),
                }
                page["findings"][label] = entry
            phrases = [(label, phrase) for label, phrase in record.finding_phrases if label in found]
            if fused and phrases:
                assert tokenizer is not None
                embedded = phrase_embeddings(module, tokenizer, [p for _, p in phrases], int(cfg.data.max_text_length))
                heat = phrase_heatmaps(module, images[offset : offset + 1], embedded)[0].cpu().numpy()
                for (label, phrase), phrase_embedding, phrase_map in zip(phrases, embedded, heat, strict=True):
                    slug = _UNSAFE_FILE_CHARS.sub("_", label)
                    entry = page["findings"][label]
                    entry["phrase"] = phrase
                    entry["grounding"] = grounding_scores.add(label, _min_max(phrase_map), found[label])
                    entry["grounding_png"] = _overlay(pixels, phrase_map, image_dir / f"{stem}_phrase_{slug}.png")
                    alignment.add(label, phrase_map, found)
                    phrase_rows.append(phrase_embedding.cpu())
                    phrase_owner.append(k)
                    phrase_labels.append(label)
            pages.append(page)
        position += images.shape[0]

    scores: dict[str, Any] = {
        "num_images": len(rows),
        "checkpoint": checkpoint,
        "threshold": asdict(threshold),
        "gradcam_layer": target_layer(module.image_encoder, image_size=size)[0],
        "gradcam": gradcam_scores.summary(),
        "grounding": None,
    }
    if fused:
        with torch.no_grad():  # a 1x1 grid (a ResNet at 32 px) cannot localise: its scores are chance
            scores["grounding_grid"] = list(region_embeddings(module, images[:1])[1])
        labels = bundle["labels"].numpy()
        negatives = np.array([labels[:, names.index(label)] == 0 for label in phrase_labels]).reshape(
            len(phrase_labels), len(rows)
        )
        ranking = (
            phrase_image_ranking(torch.stack(phrase_rows), phrase_owner, torch.cat(image_embeddings), negatives)
            if phrase_rows
            else float("nan")
        )
        scores["grounding"] = {
            **grounding_scores.summary(),
            **alignment.summary(),
            "phrase_image_ranking": ranking,
            "chance_phrase_image_ranking": 0.5,
        }
    (out_dir / SCORES_FILE).write_text(json.dumps(jsonable({**scores, "images": pages}), indent=2))
    (out_dir / INDEX_FILE).write_text(_index_html(run_dir, scores, pages))
    return scores


def _original_size(record: CxrRecord) -> tuple[int, int] | None:
    """``(width, height)`` of a file-backed record's image when its boxes need scaling (header only)."""
    if record.lesion_mask is not None or not record.boxes or isinstance(record.image, np.ndarray):
        return None
    with Image.open(record.image) as image:
        return image.size


def _min_max(heatmap: np.ndarray) -> np.ndarray:
    """Scaled to [0, 1]; a map flat up to float noise stays flat (zeros) rather than amplifying the noise."""
    low, high = float(heatmap.min()), float(heatmap.max())
    flat = high - low <= PEAK_TOLERANCE * max(abs(low), abs(high))
    return np.zeros_like(heatmap) if flat else (heatmap - low) / (high - low)


def _overlay(pixels: np.ndarray, heatmap: np.ndarray, path: Path) -> str:
    """Write the heatmap over the image (:func:`fedvlm.explain.render.save_heatmap_png`); its name."""
    save_heatmap_png(pixels, heatmap.ravel(), heatmap.shape, path)
    return f"images/{path.name}"


def _index_html(run_dir: Path, scores: dict[str, Any], pages: Sequence[dict[str, Any]]) -> str:
    """The index page: aggregate scores, then one row per explained finding with its overlays."""

    def number(value: Any) -> str:
        return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"

    def image(src: str | None, alt: str) -> str:
        return f"<img class='smear' src='{html.escape(src)}' alt='{html.escape(alt)}'>" if src else ""

    parts = [
        f"<h1>Chest X-ray explanations · {html.escape(str(run_dir))}</h1>",
        "<h2>Scores</h2>",
        "<table><tr><th>heatmap</th><th>label</th><th>n</th><th>pointing</th><th>chance</th>"
        "<th>mIoU</th><th>chance</th></tr>",
    ]
    for kind in ("gradcam", "grounding"):
        summary = scores.get(kind)
        if not summary:
            continue
        per_label = {**summary["per_label"], "mean over labels": {**summary, "count": summary["num_heatmaps"]}}
        for label, row in per_label.items():
            parts.append(
                f"<tr><td style='text-align:left'>{kind}</td><td style='text-align:left'>{html.escape(label)}</td>"
                f"<td>{row['count']}</td><td>{number(row['pointing_accuracy'])}</td>"
                f"<td>{number(row['chance_pointing_accuracy'])}</td><td>{number(row['miou'])}</td>"
                f"<td>{number(row['chance_miou'])}</td></tr>"
            )
    parts.append("</table>")
    grounding = scores.get("grounding")
    if grounding:
        parts.append("<h2>Text alignment</h2><table><tr><th>score</th><th>value</th><th>chance</th></tr>")
        for key in (
            "text_alignment_accuracy",
            "text_alignment_accuracy_multi_finding",
            "text_region_discrimination",
            "phrase_image_ranking",
        ):
            parts.append(
                f"<tr><td style='text-align:left'>{key}</td><td>{number(grounding[key])}</td>"
                f"<td>{number(grounding[f'chance_{key}'])}</td></tr>"
            )
        parts.append("</table>")
    threshold = scores["threshold"]
    parts.append(
        f"<p class='note'>mIoU thresholds each heatmap ({html.escape(threshold['mode'])}, {threshold['value']}); "
        "chance: a uniformly random point / a mask of the same size placed at random. Red: high, blue: low.</p>"
    )
    parts.append(
        "<h2>Images</h2><table><tr><th>study</th><th>finding</th><th>P</th><th>image</th>"
        "<th>lesion</th><th>Grad-CAM</th><th>report phrase</th></tr>"
    )
    for page in pages:
        for label, entry in page["findings"].items():
            phrase = html.escape(entry.get("phrase", ""))
            parts.append(
                f"<tr><td style='text-align:left'>{html.escape(str(page['study']))}<br>"
                f"{html.escape(str(page['site'] or ''))}</td><td style='text-align:left'>{html.escape(label)}</td>"
                f"<td>{number(entry['probability'])}</td><td>{image(page['image'], 'image')}</td>"
                f"<td>{image(entry['lesion_png'], 'lesion')}</td>"
                f"<td>{image(entry['gradcam_png'], 'Grad-CAM')}<br>pointing {number(entry['gradcam']['pointing'])}, "
                f"IoU {number(entry['gradcam']['iou'])}</td>"
                f"<td>{image(entry.get('grounding_png'), 'grounding')}<br>{phrase}</td></tr>"
            )
    parts.append("</table>")
    return _page("Chest X-ray explanations", "\n".join(parts))
