"""``explain_cxr_run``: Grad-CAM and phrase grounding of a trained chest X-ray run, scored against
known lesions (the synthetic generator's masks, ChestX-ray14 boxes), with HTML pages.

The scoring itself (pointing accuracy, mIoU, thresholds) lives in :mod:`fedvlm.tasks.cxr.scores`;
this module loads a run (config, checkpoint, data), so it sits above ``explain`` and ``tasks``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedvlm.config import load_config
from fedvlm.data.prepared import make_loader, subset
from fedvlm.errors import ConfigError, DataError
from fedvlm.explain.render import html_page, save_heatmap_png
from fedvlm.runs import RunLayout, jsonable
from fedvlm.tasks.base import load_run_tokenizer, load_trained_module
from fedvlm.tasks.cxr.module import ContrastiveVLM
from fedvlm.tasks.cxr.records import CxrRecord, prepare_cxr_bundle
from fedvlm.tasks.cxr.scores import (
    PEAK_TOLERANCE,
    HeatmapThreshold,
    LocalizationScores,
    label_regions,
)
from fedvlm.tasks.cxr.task import CxrTask

EXPLAIN_BATCH_SIZE = 16
SCORES_FILE = "scores.json"
INDEX_FILE = "index.html"
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def explain_cxr_run(
    run_dir: Path | str,
    num_images: int,
    out_dir: Path | str,
    threshold: HeatmapThreshold | None = None,
    checkpoint: str = "last",
    client: int = 0,
) -> dict[str, Any]:
    """Explain a trained chest X-ray run on one site's test images with known lesions, and score
    the heatmaps.

    Prepared bundles carry no lesions, so the site's records are read again from its source
    (:meth:`fedvlm.tasks.cxr.task.CxrTask.read_site`; the synthetic generator is deterministic in
    ``seed``) and matched to the site's test split by the bundle's ``index``; their images are
    checked against the prepared ones. Only client ``client``'s data are read. The first
    ``num_images`` test images (in test order) with a mask or box of one of the run's labels are
    explained:

    * Grad-CAM of each localised label's logit (:mod:`fedvlm.explain.gradcam`);
    * for a vision-language model, the grounding heatmap of each finding's report phrase
      (:mod:`fedvlm.tasks.cxr.grounding`).

    Args:
        run_dir: A run directory written by ``fedvlm fit`` (task ``cxr``).
        num_images: How many test images to explain (fewer when fewer have lesions).
        out_dir: Where ``scores.json``, ``index.html`` and ``images/*.png`` go (created).
        threshold: Binarisation for mIoU (default: ``≥ 0.5 · max``); grounding heatmaps are
            min–max scaled to [0, 1] first.
        checkpoint: ``last`` or ``best``.
        client: The partition id of the site whose test split is explained.

    Returns:
        The aggregate scores: ``gradcam`` (:meth:`LocalizationScores.summary`: pointing accuracy,
        mIoU per label and mean, their chance levels), ``grounding`` (the same for phrase heatmaps
        plus :class:`~fedvlm.tasks.cxr.grounding.TextAlignmentScores` and ``phrase_image_ranking``;
        None for an image-only model), ``num_images``, ``threshold``, ``gradcam_layer`` and
        ``grounding_grid`` (the region grid; a 1×1 grid cannot localise and scores chance).

    Raises:
        ConfigError: For a run that is not a chest X-ray run, a text-only model or a missing
            checkpoint.
        DataError: When no test image has a lesion mask or box, or the regenerated records do
            not match the prepared test images.
    """
    from fedvlm.explain.gradcam import target_layer  # import cycle: they use this module
    from fedvlm.tasks.cxr.gradcam import cxr_grad_cam, label_logits
    from fedvlm.tasks.cxr.grounding import (
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
    cfg = load_config(RunLayout(run_dir).config)
    if cfg.task != "cxr":
        raise ConfigError(f"CXR explanations need a task=cxr run; {run_dir} is task={cfg.task}")
    module = load_trained_module(run_dir, cfg, checkpoint)
    assert isinstance(module, ContrastiveVLM)
    if module.image_encoder is None:
        raise ConfigError("CXR explanations need an image tower; this run is text-only (model.modality=text)")
    fused = module.modality == "fused"
    names = module.label_names
    size = int(cfg.data.image_size)
    from fedvlm.data.sites import client_source
    from fedvlm.tasks.site_store import client_site

    test = client_site(run_dir, client).test
    site_records = CxrTask().read_site(client_source(cfg, client).cfg)
    num_records = len(site_records.index)
    indices = test["index"].tolist()
    beyond = [i for i in indices if i >= num_records]
    if beyond:
        raise DataError(f"test index {beyond[0]} is beyond the {num_records} regenerated records of {run_dir}")
    records = dict(zip(indices, site_records.records(np.asarray(indices, dtype=np.int64)), strict=True))  # type: ignore[attr-defined]
    rows, chosen, regions = [], [], []
    for row, index in enumerate(indices):
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
            f"the records regenerated from {RunLayout(run_dir).config} do not match the prepared test images "
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
    return html_page("Chest X-ray explanations", "\n".join(parts))
