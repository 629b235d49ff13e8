"""The Fed-MMX leukemia task: detection + staging from blood smears and clinical narratives."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedvlm.data.leukemia_layouts import load_leukemia
from fedvlm.data.partition import partition, split_train_test, summarize_partition
from fedvlm.data.prepared import Bundle, bundle_size, load_bundle, make_loader, prepare_bundle, subset
from fedvlm.data.records import STAGE_NAMES, LeukemiaRecord
from fedvlm.errors import DataError
from fedvlm.evaluation.metrics import AUROC_BINS, LeukemiaMetrics
from fedvlm.explain.callback import ShapCallback
from fedvlm.models.leukemia import LeukemiaModule
from fedvlm.models.tokenizer import load_tokenizer
from fedvlm.tasks.base import (
    DATA_DIR,
    TOKENIZER_DIR,
    client_dir,
    import_class,
    load_client_shards,
    make_tokenizer,
    read_meta,
    save_shards,
    tasks,
    test_shard_path,
    write_meta,
)

TRUTH_FILE = "truth.json"
EXPLANATIONS_DIR = "explanations"


def load_records(cfg: DictConfig) -> list[LeukemiaRecord]:
    """The records ``cfg.data`` names: generated (``format=synthetic``) or read from disk.

    Raises:
        DataError: Naming the file, row or value at fault; nothing is skipped silently.
    """
    data = cfg.data
    if data.format == "synthetic" and data.root is None:
        from fedvlm.data.synthetic_leukemia import SynthLeukemiaConfig, generate_leukemia

        synth: dict[str, Any] = OmegaConf.to_container(data.synthetic)  # type: ignore[assignment]
        records = generate_leukemia(SynthLeukemiaConfig(**synth, image_size=data.image_size, seed=cfg.seed))
    else:
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
    return np.array(
        [0 if r.leukemia == 0 else (num_stages + 1 if r.stage is None else r.stage + 1) for r in records],
        dtype=np.int64,
    )


def class_names(num_stages: int) -> dict[int, str]:
    names = {0: "negative", num_stages + 1: "positive_unknown_stage"}
    names.update({s + 1: f"stage_{STAGE_NAMES[s] if s < len(STAGE_NAMES) else s + 1}" for s in range(num_stages)})
    return names


class LeukemiaTask:
    """Leukemia detection and staging (Fed-MMX)."""

    name = "leukemia"
    selection_metric = "test/stage_macro_f1"  # as in the paper
    curve_metrics = ("test/accuracy", "test/auroc", "test/stage_macro_f1")
    per_sample_files = (TRUTH_FILE,)  # the generator's ground-truth explanation signals

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        records = load_records(cfg)
        num_stages = cfg.model.num_stages
        classes = label_classes(records, num_stages)
        patients = np.array([r.patient for r in records])
        train_idx, test_idx = split_train_test(classes, patients, cfg.data.test_fraction, cfg.seed)
        centralized = cfg.federation.mode == "centralized"
        sites = np.array([r.site for r in records], dtype=object)
        shards = partition(
            "single" if centralized else cfg.data.partition.name,
            classes[train_idx],
            1 if centralized else cfg.federation.num_clients,
            cfg.seed,
            groups=patients[train_idx],
            sites=sites[train_idx],
            alpha=cfg.data.partition.alpha,
            min_size=cfg.data.partition.min_size,
            max_size=cfg.data.partition.max_size,
        )
        client_indices = [train_idx[shard] for shard in shards]

        tokenizer = None
        if cfg.model.modality != "image":
            tokenizer = make_tokenizer(cfg, [records[i].report for i in train_idx], run_dir)

        everything = prepare_bundle(records, tokenizer, cfg.data.image_size, cfg.data.max_text_length)
        data_dir = run_dir / DATA_DIR
        client_sizes = save_shards(cfg, run_dir, everything, test_idx, client_indices, classes, patients)

        names = class_names(num_stages)
        summary = summarize_partition(shards, classes[train_idx], names)
        for row, sizes, indices in zip(summary, client_sizes, client_indices, strict=True):
            row.update(sizes)
            site_values = sorted({str(records[i].site) for i in indices})
            row["sites"] = site_values
        test_counts = {names[c]: int((classes[test_idx] == c).sum()) for c in sorted(names)}
        (run_dir / "partition.json").write_text(
            json.dumps({"clients": summary, "test": {"num_samples": len(test_idx), "by_label": test_counts}}, indent=2)
        )
        write_truth(records, data_dir / TRUTH_FILE)
        meta = {
            "num_samples": len(records),
            "num_train": len(train_idx),
            "num_test": len(test_idx),
            "num_clients": len(client_indices),
            "client_sizes": client_sizes,
            "vocab_size": len(tokenizer) if tokenizer is not None else None,
        }
        write_meta(run_dir, meta)
        return meta

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        meta = read_meta(run_dir)
        module_class = (
            import_class(cfg.model.module_class, LeukemiaModule) if cfg.model.module_class else LeukemiaModule
        )
        return module_class(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            image_size=cfg.data.image_size,
            vocab_size=meta["vocab_size"],
        )

    def load_client(self, run_dir: Path, partition_id: int) -> tuple[Bundle, Bundle]:
        return load_client_shards(run_dir, partition_id)

    def load_test(self, run_dir: Path) -> Bundle:
        return load_bundle(test_shard_path(run_dir))

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> LeukemiaMetrics:
        return LeukemiaMetrics(cfg.model.num_stages, auroc_bins=AUROC_BINS if mergeable else None)

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule, bundle: Bundle, metrics: torch.nn.Module, batch_size: int) -> None:
        assert isinstance(metrics, LeukemiaMetrics) and isinstance(module, LeukemiaModule)
        if bundle_size(bundle) == 0:
            return
        was_training = module.training
        module.eval()
        device = module.device
        for batch in make_loader(bundle, batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            leukemia_prob, stage_prob = module.predict_probabilities(batch)
            metrics.update(
                leukemia_prob.float().cpu(), batch["leukemia"].cpu(), stage_prob.float().cpu(), batch["stage"].cpu()
            )
        module.train(was_training)

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        assert isinstance(metrics, LeukemiaMetrics)
        return metrics.compute_scalars()

    def round_callbacks(self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int) -> list[L.Callback]:
        explain = cfg.explain
        if not explain.enabled or server_round % explain.every != 0:
            return []
        train, val = self.load_client(run_dir, partition_id)
        return [
            make_shap_callback(
                cfg,
                run_dir,
                val if bundle_size(val) else train,
                explain.patients,
                client_dir(run_dir, partition_id) / EXPLANATIONS_DIR,
                server_round,
            )
        ]


def make_shap_callback(
    cfg: DictConfig, run_dir: Path, bundle: Bundle, num_patients: int, output_dir: Path, server_round: int
) -> ShapCallback:
    """The :class:`ShapCallback` for the first ``num_patients`` rows of ``bundle`` (with the
    generator's ground truth when the data are synthetic), configured by ``cfg.explain``."""
    explain = cfg.explain
    patients = subset(bundle, range(min(num_patients, bundle_size(bundle))))
    tokenizer = load_tokenizer(str(run_dir / TOKENIZER_DIR)) if cfg.model.modality != "image" else None
    blast_points, signal_words = read_truth(
        run_dir / DATA_DIR / TRUTH_FILE, patients["index"].tolist(), cfg.data.image_size
    )
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


def write_truth(records: Sequence[LeukemiaRecord], path: Path) -> None:
    """Save what the data source knows about where the signal is (blast centres as fractions of
    the image size, signal words), by global sample index; nothing is written when it knows nothing."""
    truth = {}
    for index, record in enumerate(records):
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
