"""The Fed-MMX leukemia task: detection + staging from blood smears and clinical narratives."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import Bundle, Samples, bundle_size, subset
from fedvlm.errors import DataError
from fedvlm.evaluation.metrics import AUROC_BINS
from fedvlm.runs import RunLayout
from fedvlm.tasks.base import (
    PreparedSites,
    is_synthetic,
    make_tokenizer,
    mean_of,
    module_class,
    read_meta,
    run_tokenizer,
    synthetic_everywhere,
    tasks,
    write_meta,
)
from fedvlm.tasks.leukemia.layouts import load_leukemia
from fedvlm.tasks.leukemia.metrics import LeukemiaMetrics
from fedvlm.tasks.leukemia.module import LeukemiaModule
from fedvlm.tasks.leukemia.records import STAGE_NAMES, LeukemiaRecord, leukemia_image_spec, leukemia_tensors
from fedvlm.tasks.leukemia.shap import SHARED_PATIENTS, ShapCallback
from fedvlm.tasks.site import SourceIndex
from fedvlm.tasks.site_store import SiteData

TRUTH_FILE = "truth.json"
"""Per-sample ground truth of the generator, in the site's own data folder (never the coordinator's)."""


def synthetic_config(cfg: DictConfig) -> Any:
    """The generator's config for ``cfg.data`` (``format=synthetic`` without a root)."""
    from fedvlm.tasks.leukemia.synthetic import SynthLeukemiaConfig

    synth: dict[str, Any] = OmegaConf.to_container(cfg.data.synthetic)  # type: ignore[assignment]
    return SynthLeukemiaConfig(**synth, image_size=cfg.data.image_size, seed=cfg.seed)


def load_records(cfg: DictConfig) -> list[LeukemiaRecord]:
    """The records of the one source ``cfg.data`` names, read from disk (images not decoded).

    Raises:
        DataError: Naming the file, row or value at fault; nothing is skipped silently.
    """
    data = cfg.data
    if data.root is None:
        raise DataError(f"data.format={data.format} needs data.root=<folder or manifest>")
    fmt = "auto" if data.format == "synthetic" else data.format
    records = load_leukemia(
        fmt,
        Path(data.root).expanduser(),
        Path(data.reports).expanduser() if data.reports else None,
        cfg.model.num_stages,
    )
    for record in records:
        record.validate(cfg.model.num_stages)
    if cfg.model.modality != "image":
        empty = [r.source for r in records if not r.report.strip()]
        if empty:
            raise DataError(
                f"{len(empty)} samples have an empty report (first: {empty[0]}); a model with "
                "model.modality=fused or text needs a report for every image (give data.reports=...)"
            )
    return records


def label_classes(records: Sequence[LeukemiaRecord], num_stages: int) -> np.ndarray:
    """One class per sample for stratification and skew: 0 negative, 1..K stage, K+1 unknown."""
    leukemia = np.array([r.leukemia for r in records], dtype=np.int64)
    stage = np.array([-1 if r.stage is None else r.stage for r in records], dtype=np.int64)
    return classes_of(leukemia, stage, num_stages)


def classes_of(leukemia: np.ndarray, stage: np.ndarray, num_stages: int) -> np.ndarray:
    """:func:`label_classes` from label arrays (``stage`` −1 where unknown)."""
    return np.where(leukemia == 0, 0, np.where(stage < 0, num_stages + 1, stage + 1)).astype(np.int64)


class LeukemiaSiteRecords:
    """One leukemia source: read from disk (image paths, decoded on demand) or drawn by the
    generator (labels first, images rendered only for the rows a client keeps)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        num_stages = int(cfg.model.num_stages)
        self.class_names = class_names(num_stages)
        self.image_spec = leukemia_image_spec(int(cfg.data.image_size))
        self._records: dict[int, LeukemiaRecord] = {}
        if is_synthetic(cfg.data):
            from fedvlm.tasks.leukemia.synthetic import leukemia_label_index

            self.synth = synthetic_config(cfg)
            labels = leukemia_label_index(self.synth)
            classes = classes_of(labels.leukemia, labels.stage, num_stages)
            self.index = SourceIndex(classes, np.asarray(labels.patient), np.asarray(labels.site, dtype=object))
        else:
            self.synth = None
            records = load_records(cfg)
            self._records = dict(enumerate(records))
            self.index = SourceIndex(
                label_classes(records, num_stages),
                np.array([r.patient for r in records]),
                np.array([r.site for r in records], dtype=object),
            )

    def records(self, rows: np.ndarray) -> list[LeukemiaRecord]:
        missing = [int(i) for i in rows if int(i) not in self._records]
        if missing:  # the generator renders only the rows this site keeps
            from fedvlm.tasks.leukemia.synthetic import generate_leukemia_with_truth

            self._records.update(
                zip(missing, generate_leukemia_with_truth(self.synth, indices=missing)[0], strict=True)
            )
        return [self._records[int(i)] for i in rows]

    def tensors(self, rows: np.ndarray, tokenizer: PreTrainedTokenizerBase | None) -> Bundle:
        return leukemia_tensors(
            self.records(rows), tokenizer, self.cfg.data.max_text_length, indices=[int(i) for i in rows]
        )

    def images(self, rows: np.ndarray) -> list[np.ndarray | Path]:
        return [record.image for record in self.records(rows)]

    def write_site_files(self, rows: np.ndarray, directory: Path) -> None:
        write_truth(rows, self.records(rows), directory / TRUTH_FILE)

    def extra_counts(self, rows: np.ndarray) -> dict[str, Any]:
        return {}


def class_names(num_stages: int) -> dict[int, str]:
    names = {0: "negative", num_stages + 1: "positive_unknown_stage"}
    names.update({s + 1: f"stage_{STAGE_NAMES[s] if s < len(STAGE_NAMES) else s + 1}" for s in range(num_stages)})
    return names


class LeukemiaTask(PreparedSites):
    """Leukemia detection and staging (Fed-MMX)."""

    name = "leukemia"
    selection_metric = "stage_macro_f1"  # the paper's; on the merged validation split by default
    curve_metrics = ("test/accuracy", "test/auroc", "test/stage_macro_f1")

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        public: list[str] = []
        if synthetic_everywhere(cfg):
            from fedvlm.tasks.leukemia.synthetic import report_vocabulary

            public = report_vocabulary()
        tokenizer = make_tokenizer(cfg, run_dir, public)
        meta = {"vocab_size": len(tokenizer) if tokenizer is not None else None}
        write_meta(run_dir, meta)
        return meta

    def read_site(self, cfg: DictConfig) -> LeukemiaSiteRecords:
        return LeukemiaSiteRecords(cfg)

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        meta = read_meta(run_dir)
        return module_class(cfg, LeukemiaModule)(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            image_size=cfg.data.image_size,
            vocab_size=meta["vocab_size"],
        )

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> LeukemiaMetrics:
        return LeukemiaMetrics(cfg.model.num_stages, auroc_bins=AUROC_BINS if mergeable else None)

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule, batches: Iterable[Any], metrics: torch.nn.Module) -> None:
        assert isinstance(metrics, LeukemiaMetrics) and isinstance(module, LeukemiaModule)
        was_training = module.training
        module.eval()
        device = module.device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            leukemia_prob, stage_prob = module.predict_probabilities(batch)
            metrics.update(
                leukemia_prob.float().cpu(), batch["leukemia"].cpu(), stage_prob.float().cpu(), batch["stage"].cpu()
            )
        module.train(was_training)

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        assert isinstance(metrics, LeukemiaMetrics)
        return metrics.compute_scalars()

    def flip_labels(self, cfg: DictConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``leukemia`` ``0 ↔ 1`` and ``stage`` ``k → K−1−k`` for ``k ≥ 0`` (``-1``, no stage, stays).

        Example:
            >>> from fedvlm.config import load_config
            >>> flipped = LeukemiaTask().flip_labels(
            ...     load_config(None, ["model.num_stages=4"]),
            ...     {"leukemia": torch.tensor([0, 1, 1]), "stage": torch.tensor([-1, 0, 3])})
            >>> flipped["leukemia"].tolist(), flipped["stage"].tolist()
            ([1, 0, 0], [-1, 3, 0])
        """
        stage = tensors["stage"]
        num_stages = int(cfg.model.num_stages)
        return {
            **tensors,
            "leukemia": 1 - tensors["leukemia"],
            "stage": torch.where(stage >= 0, num_stages - 1 - stage, stage),
        }

    def reduce_shared(self, key: str, values: Sequence[float]) -> float:
        """Explanation quality over clients: maxima stay maxima, patient counts add up, the rest is the mean."""
        if key.endswith("_max"):
            return max(values)
        if key == SHARED_PATIENTS:
            return sum(values)
        return mean_of(values)

    def round_callbacks(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int, site: SiteData
    ) -> list[L.Callback]:
        explain = cfg.explain
        if not explain.enabled or server_round % explain.every != 0:
            return []
        return [
            make_shap_callback(
                cfg,
                run_dir,
                site.val if bundle_size(site.val) else site.train,
                explain.patients,
                RunLayout(run_dir).client_explanations(partition_id),
                server_round,
                site.directory,
            )
        ]


def make_shap_callback(
    cfg: DictConfig,
    run_dir: Path,
    bundle: Samples,
    num_patients: int,
    output_dir: Path,
    server_round: int,
    site_dir: Path,
) -> ShapCallback:
    """The :class:`ShapCallback` for the first ``num_patients`` rows of ``bundle`` (with the
    generator's ground truth, kept in the site's ``site_dir``, when the data are synthetic),
    configured by ``cfg.explain``."""
    explain = cfg.explain
    patients = subset(bundle, range(min(num_patients, bundle_size(bundle))))
    tokenizer = run_tokenizer(cfg, run_dir)
    blast_points, signal_words = read_truth(site_dir / TRUTH_FILE, patients["index"].tolist(), cfg.data.image_size)
    callback = ShapCallback(
        output_dir,
        patients,
        image_baseline=explain.image_baseline,
        text_baseline=explain.text_baseline,
        max_evals=explain.max_evals,
        top_k=explain.top_k,
        share_summary=explain.share_summary,
        tokenizer=tokenizer,
        blast_points=blast_points,
        signal_words=signal_words,
        seed=cfg.seed,
    )
    callback.round = server_round
    return callback


def write_truth(indices: Sequence[int] | np.ndarray, records: Sequence[LeukemiaRecord], path: Path) -> None:
    """Save what the data source knows about where the signal is (blast centres as fractions of
    the image size, signal words) of ``records``, by their sample ``indices`` in the source;
    nothing is written when it knows nothing."""
    truth = {}
    for index, record in zip((int(i) for i in indices), records, strict=True):
        if record.blast_points or record.signal_words:
            if isinstance(record.image, np.ndarray):
                height, width = record.image.shape[:2]
            else:
                from fedvlm.data.images import read_image

                height, width = read_image(record.image).shape[:2]
            truth[str(index)] = {
                "blast_points": [[x / width, y / height] for x, y in record.blast_points],
                "signal_words": list(record.signal_words),
            }
    if truth:
        path.write_text(json.dumps(truth))


def read_truth(
    path: Path, indices: Sequence[int], image_size: int
) -> tuple[list[list[tuple[float, float]]] | None, list[list[str]] | None]:
    """Blast centres (in pixels of ``image_size`` images) and signal words of ``indices``; (None, None)
    when the data source has no ground truth."""
    if not path.is_file():
        return None, None
    truth = json.loads(path.read_text())
    entries = [truth.get(str(i), {"blast_points": [], "signal_words": []}) for i in indices]
    points = [[(x * image_size, y * image_size) for x, y in e["blast_points"]] for e in entries]
    return points, [list(e["signal_words"]) for e in entries]


tasks.register("leukemia")(LeukemiaTask)
