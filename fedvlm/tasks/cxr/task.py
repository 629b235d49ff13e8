"""The FedVLM chest X-ray task: contrastive image–report alignment, evaluated zero-shot.

Data come from the synthetic generator (``data.format=synthetic``), a CXR manifest, or a real
layout (``mimic_cxr``, ``chestxray14``, ``openi``; ``auto`` recognises it). Patients never cross
the train/test split; the official test split is used when the source has one. Hospitals
(clients) are formed by site (``data.partition.name=site``) or by any partitioner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fedvlm.data.prepared import Bundle, load_bundle, save_bundle, tokenize
from fedvlm.data.sites import read_site_entries, site_config
from fedvlm.errors import ConfigError, DataError
from fedvlm.evaluation.metrics import AUROC_BINS
from fedvlm.runs import RunLayout
from fedvlm.tasks.base import (
    PreparedSites,
    is_synthetic,
    make_tokenizer,
    module_class,
    read_meta,
    synthetic_everywhere,
    tasks,
    write_meta,
)
from fedvlm.tasks.cxr.metrics import CxrMetrics
from fedvlm.tasks.cxr.module import ContrastiveVLM
from fedvlm.tasks.cxr.records import CHESTXRAY14_LABELS, CHEXPERT_LABELS, CxrDataset, cxr_image_spec, cxr_tensors
from fedvlm.tasks.site import SourceIndex
from fedvlm.tasks.site_store import SiteData

if TYPE_CHECKING:
    from fedvlm.tasks.cxr.synthetic_reports import PromptSet

CXR_FORMATS = ("synthetic", "manifest", "auto", "mimic_cxr", "chestxray14", "openi")


def source_label_names(cfg: DictConfig) -> tuple[str, ...]:
    """The label names of the configured data source, before ``data.labels`` selects from them.

    Read from the layout's schema (a manifest's header, the layout's fixed label set), never from
    the samples; with ``data.sites`` every site's schema must agree, unless ``data.labels`` picks.

    Raises:
        ConfigError: If the sites' label sets differ and ``data.labels`` does not choose.
    """
    entries = read_site_entries(cfg.data.sites)
    if entries is not None:
        schemas = {entry["name"]: source_label_names(site_config(cfg, entry)) for entry in entries}
        distinct = set(schemas.values())
        if len(distinct) > 1 and not cfg.data.labels:
            listed = "; ".join(f"{name}: {', '.join(labels)}" for name, labels in schemas.items())
            raise ConfigError(
                f"the sites have different label sets ({listed}): choose the run's with data.labels=[...]"
            )
        if len(distinct) > 1:
            return tuple(cfg.data.labels)
        return next(iter(distinct))
    fmt = cfg.data.format
    if fmt not in CXR_FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not a chest X-ray source; one of: {', '.join(CXR_FORMATS)}")
    if is_synthetic(cfg.data):
        from fedvlm.tasks.cxr.synthetic import SYNTH_CXR_LABELS

        return tuple(SYNTH_CXR_LABELS)
    if fmt == "auto" and cfg.data.root is not None and not str(cfg.data.root).endswith(".csv"):
        from fedvlm.tasks.cxr.layouts import detect_cxr_format

        fmt = detect_cxr_format(Path(cfg.data.root).expanduser())
    if fmt == "mimic_cxr":
        return CHEXPERT_LABELS
    if fmt == "chestxray14":
        return CHESTXRAY14_LABELS
    if fmt == "openi":
        from fedvlm.tasks.cxr.layouts import OPENI_LABELS

        return tuple(OPENI_LABELS)
    return manifest_label_names(cfg)


def manifest_label_names(cfg: DictConfig) -> tuple[str, ...]:
    """The label columns of a CXR manifest's header (the schema; no row is read).

    Raises:
        DataError: If the manifest is missing or has no label column.
    """
    import csv

    from fedvlm.tasks.cxr.manifest import CXR_MANIFEST_COLUMNS

    if cfg.data.root is None:
        raise DataError(f"data.format={cfg.data.format} needs data.root=<folder or manifest>")
    path = Path(cfg.data.root).expanduser()
    if not path.is_file():
        raise DataError(f"CXR manifest {path} does not exist")
    with path.open(newline="") as stream:
        header = next(csv.reader(stream), [])
    names = tuple(name.strip() for name in header if name.strip().lower() not in CXR_MANIFEST_COLUMNS)
    if not names:
        raise DataError(f"{path}:1: no label columns after {', '.join(CXR_MANIFEST_COLUMNS)}")
    return names


def label_names(cfg: DictConfig) -> tuple[str, ...]:
    """The labels a run trains and evaluates: ``data.labels`` or all of the source's.

    Raises:
        ConfigError: If ``data.labels`` names a label the source does not have.
    """
    available = source_label_names(cfg)
    if not cfg.data.labels:
        return available
    unknown = [name for name in cfg.data.labels if name not in available]
    if unknown:
        raise ConfigError(f"data.labels: unknown label(s) {unknown}; this source has: {', '.join(available)}")
    return tuple(cfg.data.labels)


def synthetic_cxr_config(cfg: DictConfig) -> Any:
    """The generator's config for ``cfg.data`` (``format=synthetic`` without a root)."""
    from fedvlm.tasks.cxr.synthetic import SynthCxrConfig

    data = cfg.data
    shift = data.synthetic_cxr
    return SynthCxrConfig(
        n=data.synthetic.n,
        num_sites=data.synthetic.num_sites,
        image_size=data.image_size,
        seed=cfg.seed,
        prevalence=dict(shift.prevalence),
        prevalence_shift=shift.prevalence_shift,
        style_shift=shift.style_shift,
        p_followup=shift.p_followup,
    )


def load_dataset_unselected(cfg: DictConfig) -> CxrDataset:
    """The records ``cfg.data`` names, with every label of the source."""
    data = cfg.data
    if data.format not in CXR_FORMATS:
        raise ConfigError(f"data.format={data.format!r} is not a chest X-ray source; one of: {', '.join(CXR_FORMATS)}")
    if is_synthetic(data):
        from fedvlm.tasks.cxr.synthetic import generate_cxr

        return generate_cxr(synthetic_cxr_config(cfg))
    if data.root is None:
        raise DataError(f"data.format={data.format} needs data.root=<folder or manifest>")
    root = Path(data.root).expanduser()
    if data.format == "manifest" or (data.format in ("synthetic", "auto") and root.suffix == ".csv"):
        from fedvlm.tasks.cxr.manifest import read_cxr_manifest

        if data.reports:
            raise ConfigError("data.reports is not used with a CXR manifest (its `report` column holds the text)")
        return read_cxr_manifest(root)
    from fedvlm.tasks.cxr.layouts import load_cxr

    fmt = "auto" if data.format == "synthetic" else data.format
    return load_cxr(fmt, root, Path(data.reports).expanduser() if data.reports else None, uncertain=data.uncertain)


def load_dataset(cfg: DictConfig) -> CxrDataset:
    """The records ``cfg.data`` names, restricted to the labels the run uses.

    Raises:
        DataError: Naming the file, row or value at fault; or when a model that reads reports
            meets records without one.
    """
    dataset = select_labels(load_dataset_unselected(cfg), label_names(cfg))
    if not dataset.records:
        raise DataError(f"no chest X-ray records in {cfg.data.root or 'the synthetic generator'}")
    if cfg.model.modality != "image":
        empty = [r.source or r.patient for r in dataset.records if not r.report.strip()]
        if empty:
            raise DataError(
                f"{len(empty)} images have no report (first: {empty[0]}); model.modality={cfg.model.modality} "
                "needs one for every image (ChestX-ray14 is image-only: use model.modality=image)"
            )
    return dataset


def select_labels(dataset: CxrDataset, names: Sequence[str]) -> CxrDataset:
    """``dataset`` validated, with only the label columns ``names`` (in that order)."""
    dataset.validate()
    if tuple(names) == tuple(dataset.label_names):
        return dataset
    columns = [dataset.label_names.index(name) for name in names]
    return CxrDataset(
        [_with_labels(r, tuple(r.labels[c] for c in columns)) for r in dataset.records], tuple(names), dataset.skipped
    )


def _with_labels(record: Any, labels: tuple[float, ...]) -> Any:
    from dataclasses import replace

    return replace(record, labels=labels)


def default_prompts(names: Sequence[str]) -> dict[str, PromptSet]:
    """Prompts per label: the generator's wording where it has one, else ``"There is <label>."`` /
    ``"No <label>."``."""
    from fedvlm.tasks.cxr.synthetic_reports import default_prompts as synthetic_prompts

    known = synthetic_prompts() | {"No Finding": (("No acute abnormality.",), ("There is an abnormality.",))}
    prompts = {}
    for name in names:
        words = name.replace("_", " ").lower()
        prompts[name] = known.get(name, ((f"There is {words}.",), (f"No {words}.",)))
    return prompts


def prompt_sets(cfg: DictConfig, names: Sequence[str]) -> dict[str, PromptSet]:
    """Default prompts overridden by ``evaluation.prompts``.

    A label's entry is either a pair ``[positive, negative]`` or an ensemble
    ``{positive: [...], negative: [...]}`` (each phrasing embedded, the embeddings averaged).

    Raises:
        ConfigError: If ``evaluation.prompts`` names an unknown label or an entry has neither form.
    """
    prompts = default_prompts(names)
    for name, entry in (cfg.evaluation.prompts or {}).items():
        if name not in prompts:
            raise ConfigError(f"evaluation.prompts: unknown label {name!r}; labels: {', '.join(names)}")
        prompts[name] = _prompt_set(f"evaluation.prompts.{name}", entry)
    return prompts


def _prompt_set(key: str, entry: Any) -> PromptSet:
    if isinstance(entry, DictConfig | dict):
        if set(entry) != {"positive", "negative"}:
            raise ConfigError(f"{key} must have exactly the keys positive and negative, got {sorted(entry)}")
        sides = [entry["positive"], entry["negative"]]
        sides = [[side] if isinstance(side, str) else list(side) for side in sides]
    elif isinstance(entry, ListConfig | list) and len(entry) == 2 and all(isinstance(t, str) for t in entry):
        sides = [[entry[0]], [entry[1]]]
    else:
        raise ConfigError(f"{key} must be [positive prompt, negative prompt] or {{positive: [...], negative: [...]}}")
    if not all(sides) or not all(isinstance(text, str) and text.strip() for side in sides for text in side):
        raise ConfigError(f"{key}: every side needs at least one non-empty prompt")
    return tuple(sides[0]), tuple(sides[1])


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: dict[str, PromptSet], names: Sequence[str], max_length: int
) -> Bundle:
    """``input_ids``/``attention_mask`` ``[C, 2, M, L]`` of the prompts, in label order: ``M`` is
    the largest number of phrasings of any side; missing phrasings are all-zero rows (attention
    mask 0), which :meth:`ContrastiveVLM.set_prompts` skips."""
    width = max(len(side) for name in names for side in prompts[name])
    input_ids = torch.zeros(len(names), 2, width, max_length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for c, name in enumerate(names):
        for k, side in enumerate(prompts[name]):
            tokens = tokenize(tokenizer, list(side), max_length)
            input_ids[c, k, : len(side)] = tokens["input_ids"]
            attention_mask[c, k, : len(side)] = tokens["attention_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_texts(prompts: dict[str, PromptSet]) -> list[str]:
    """Every phrasing of every label (for the tokenizer's vocabulary)."""
    return [text for positives, negatives in prompts.values() for text in (*positives, *negatives)]


def stratification_classes(labels: np.ndarray) -> np.ndarray:
    """One class per sample for stratified splits: the first present label, ``C`` when none is
    present, ``C + 1`` when nothing is known."""
    num_labels = labels.shape[1]
    present = np.nan_to_num(labels, nan=0.0) == 1
    known = ~np.isnan(labels).all(axis=1)
    first = np.where(present.any(axis=1), present.argmax(axis=1), num_labels)
    return np.where(known, first, num_labels + 1).astype(np.int64)


class CxrSiteRecords:
    """One chest X-ray source: read from disk (image paths, decoded on demand) or drawn by the
    generator (labels first, radiographs rendered only for the rows a client keeps)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.names = label_names(cfg)
        self.image_spec = cxr_image_spec(int(cfg.data.image_size), bool(cfg.data.equalize))
        self._records: dict[int, Any] = {}
        self.skipped: dict[str, int] = {}
        if is_synthetic(cfg.data):
            from fedvlm.tasks.cxr.synthetic import SYNTH_CXR_LABELS, cxr_label_index

            self.synth = synthetic_cxr_config(cfg)
            index = cxr_label_index(self.synth)
            columns = [list(SYNTH_CXR_LABELS).index(name) for name in self.names]
            labels = np.asarray(index.labels, dtype=np.float32)[:, columns]
            patients, sites, official = np.asarray(index.patient), np.asarray(index.site, dtype=object), None
        else:
            self.synth = None
            dataset = load_dataset(cfg)
            self._records = dict(enumerate(dataset.records))
            self.skipped = dict(dataset.skipped)
            labels = dataset.label_matrix()
            patients = np.array([r.patient for r in dataset.records])
            sites = np.array([r.site for r in dataset.records], dtype=object)
            splits = np.array([r.split or "" for r in dataset.records])
            official = splits == "test" if (splits == "test").any() else None
        self.labels = labels
        classes = stratification_classes(labels)
        self.index = SourceIndex(classes, patients, sites, official)
        num = len(self.names)
        self.class_names = {c: self.names[c] for c in range(num)} | {num: "no_finding", num + 1: "unknown"}

    def records(self, rows: np.ndarray) -> list[Any]:
        missing = [int(i) for i in rows if int(i) not in self._records]
        if missing:  # the generator renders only the rows this site keeps
            from fedvlm.tasks.cxr.synthetic import generate_cxr

            generated = select_labels(generate_cxr(self.synth, indices=missing), self.names)
            self._records.update(zip(missing, generated.records, strict=True))
        return [self._records[int(i)] for i in rows]

    def tensors(self, rows: np.ndarray, tokenizer: PreTrainedTokenizerBase | None) -> Bundle:
        return cxr_tensors(self.records(rows), tokenizer, self.cfg.data.max_text_length, indices=[int(i) for i in rows])

    def images(self, rows: np.ndarray) -> list[np.ndarray | Path]:
        return [record.image for record in self.records(rows)]

    def write_site_files(self, rows: np.ndarray, directory: Path) -> None:
        return None

    def extra_counts(self, rows: np.ndarray) -> dict[str, Any]:
        positives = {name: int(np.nansum(self.labels[rows, c] == 1)) for c, name in enumerate(self.names)}
        return {"positives_by_label": positives, "skipped": self.skipped}


class CxrTask(PreparedSites):
    """Chest X-ray vision-language pre-training (FedVLM)."""

    name = "cxr"
    selection_metric = "macro_auroc"
    curve_metrics = ("test/macro_auroc", "test/i2t_recall@5", "test/t2i_recall@5")

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        names = label_names(cfg)
        prompts = prompt_sets(cfg, names)
        public: list[str] = []
        if synthetic_everywhere(cfg):
            from fedvlm.tasks.cxr.synthetic_reports import report_vocabulary

            public = [*report_vocabulary(), *prompt_texts(prompts)]
        tokenizer = make_tokenizer(cfg, run_dir, public)
        if tokenizer is not None:
            tokens = tokenize_prompts(tokenizer, prompts, names, cfg.data.max_text_length)
            save_bundle(tokens, RunLayout(run_dir).prompts)
        meta = {"vocab_size": len(tokenizer) if tokenizer is not None else None, "label_names": list(names)}
        write_meta(run_dir, meta)
        return meta

    def read_site(self, cfg: DictConfig) -> CxrSiteRecords:
        return CxrSiteRecords(cfg)

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        meta = read_meta(run_dir)
        module = module_class(cfg, ContrastiveVLM)(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            contrastive=OmegaConf.to_container(cfg.contrastive, resolve=True),
            optim=OmegaConf.to_container(cfg.optim, resolve=True),
            label_names=meta["label_names"],
            image_size=cfg.data.image_size,
            vocab_size=meta["vocab_size"],
        )
        prompts_path = RunLayout(run_dir).prompts
        if module.modality == "fused":
            prompts = load_bundle(prompts_path)
            module.set_prompts(prompts["input_ids"].long(), prompts["attention_mask"].long())
        return module

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> CxrMetrics:
        return CxrMetrics(
            label_names(cfg),
            auroc_bins=AUROC_BINS if mergeable else None,
            retrieval_k=tuple(cfg.evaluation.retrieval_k),
            keep_embeddings=cfg.model.modality == "fused",  # retrieval within the evaluated split
        )

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule, batches: Iterable[Any], metrics: torch.nn.Module) -> None:
        assert isinstance(metrics, CxrMetrics) and isinstance(module, ContrastiveVLM)
        was_training = module.training
        module.eval()
        device = module.device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = module.label_probabilities(batch)
            metrics.update(
                outputs["probabilities"].float().cpu(),
                batch["labels"].cpu(),
                outputs.get("image_embeddings"),
                outputs.get("text_embeddings"),
                batch["report_group"].cpu(),
            )
        module.train(was_training)

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        assert isinstance(metrics, CxrMetrics)
        return metrics.compute_scalars()

    def flip_labels(self, cfg: DictConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Multi-label ``labels`` ``0 ↔ 1``; ``nan`` (unknown) stays ``nan``.

        Example:
            >>> CxrTask().flip_labels(None, {"labels": torch.tensor([[0.0, 1.0, float("nan")]])})["labels"]
            tensor([[1., 0., nan]])
        """
        return {**tensors, "labels": 1 - tensors["labels"]}

    def round_callbacks(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int, site: SiteData
    ) -> list[L.Callback]:
        return []  # CXR explanations (Grad-CAM, grounding) run after training: `fedvlm explain`


tasks.register("cxr")(CxrTask)
