"""Site-local data: what one client prepares from its own records, in its own process.

A client (a ClientApp process under Flower's deployment engine, an actor in simulation) calls
:func:`ensure_site_data` the first time it needs data. It reads its own source
(:func:`fedvlm.data.sites.client_source`), validates it, splits it by patient into local
train / validation / test, and writes the tensors into its own folder
``RUN_DIR/clients/client_NNN/data/`` (the folder's form is :mod:`fedvlm.tasks.site_store`'s).
No split's images are ever all in memory. What leaves the site is
``counts.json``'s numbers, reported to the server in the query reply.

With one source split by ``data.partition`` (the simulation convenience), every client reads the
source's *index* (labels, patients, sites: file names and label tables, or the synthetic
generator's label pass), computes the same seeded partition, and decodes only its own rows.
The centralized baseline is one client holding the union of every federated client's local
splits, so both are tested on exactly the same samples; with ``data.sites`` it reads every site,
which is what a pooled baseline is (and the one documented exception to "one site per process").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fedvlm.data.partition import partition
from fedvlm.data.prepared import Bundle
from fedvlm.data.sites import ClientSource, client_source, read_site_entries, site_config
from fedvlm.data.split import split_train_test
from fedvlm.data.streaming import ImageSpec
from fedvlm.errors import ConfigError, DataError
from fedvlm.runs import RunLayout
from fedvlm.tasks.site_store import SPLITS, SiteData, reusable_site_data, save_site_data, write_splits


@dataclass(frozen=True)
class SourceIndex:
    """What a source says about its samples without decoding any image.

    Attributes:
        classes: One integer class per sample (stratification, partitioning, counts).
        patients: Patient of each sample: a patient never lands on two sides of a split.
        sites: Site (hospital) of each sample, or None where the source does not say.
        official_test: Where the source ships an official test split, True for its test rows.
    """

    classes: np.ndarray
    patients: np.ndarray
    sites: np.ndarray
    official_test: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)


class SiteRecords(Protocol):
    """One source as a task reads it (:meth:`Task.read_site`): an index first, tensors on demand.

    Attributes:
        index: Classes, patients and sites of every sample.
        class_names: Name of each class of ``index.classes``.
        image_spec: How the task's model sees an image (channels, size, equalisation).
    """

    @property
    def index(self) -> SourceIndex: ...

    @property
    def class_names(self) -> Mapping[int, str]: ...

    @property
    def image_spec(self) -> ImageSpec: ...

    def tensors(self, rows: np.ndarray, tokenizer: PreTrainedTokenizerBase | None) -> Bundle:
        """The per-sample tensors of ``rows`` (indices into the source), images aside."""
        ...

    def images(self, rows: np.ndarray) -> list[np.ndarray | Path]:
        """The image of each of ``rows``: its file, or the pixels where the source has no file."""
        ...

    def write_site_files(self, rows: np.ndarray, directory: Path) -> None:
        """Write per-sample side files of ``rows`` (e.g. the generator's explanation truth) into ``directory``."""
        ...

    def extra_counts(self, rows: np.ndarray) -> dict[str, Any]:
        """Further counts of ``rows`` to report (e.g. positives per label)."""
        ...


def split_by_patient(
    index: SourceIndex, rows: np.ndarray, fraction: float, seed: int, what: str, site: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (kept, held out) by patient, stratified by class.

    A site with fewer than four patients, or ``fraction`` 0, holds nothing out.

    Raises:
        DataError: If the split is impossible, naming the site.
    """
    if fraction <= 0 or len(np.unique(index.patients[rows])) < 4:
        return rows, rows[:0]
    try:
        kept, held_out = split_train_test(index.classes[rows], index.patients[rows], fraction, seed)
    except DataError as err:
        raise DataError(
            f"site {site}: cannot hold out a {what} split from its {len(rows)} samples ({err}); "
            f"set data.{what}_fraction=0 or give the site more data"
        ) from None
    return rows[kept], rows[held_out]


def local_splits(cfg: DictConfig, index: SourceIndex, rows: np.ndarray, seed: int, site: str) -> dict[str, np.ndarray]:
    """One site's local train / validation / test rows, split by patient.

    The test split is the source's official one where it has one (``official_test``), else
    ``data.test_fraction`` of the site's patients; validation is ``data.val_fraction`` of the rest.
    """
    if index.official_test is not None and index.official_test[rows].any():
        test, rest = rows[index.official_test[rows]], rows[~index.official_test[rows]]
        shared = set(index.patients[test]) & set(index.patients[rest])
        if shared:
            raise DataError(f"site {site}: the official split puts patient {sorted(shared)[0]} on both sides")
    else:
        rest, test = split_by_patient(index, rows, float(cfg.data.test_fraction), seed, "test", site)
    train, val = split_by_patient(index, rest, float(cfg.data.val_fraction), seed + 7919, "val", site)
    return {"train": train, "val": val, "test": test}


def partition_spec(cfg: DictConfig, index: SourceIndex) -> dict[str, Any]:
    """``data.partition``, or its ``fallback`` when partitioning by a site the source lacks."""
    spec = dict(cfg.data.partition)
    if spec["name"] == "site" and all(site is None for site in index.sites) and spec.get("fallback"):
        return dict(spec["fallback"])
    return spec


def client_rows(cfg: DictConfig, source: ClientSource, index: SourceIndex) -> dict[str, np.ndarray]:
    """The rows of ``index`` client ``source`` holds, per local split.

    Raises:
        DataError: If this client's partition is empty or cannot be split.
    """
    rows = np.arange(len(index))
    if source.partition is None:  # a site: all its records are its own
        return local_splits(cfg, index, rows, int(cfg.seed), source.site)
    num_clients = int(cfg.federation.num_clients)
    spec = partition_spec(cfg, index)
    options = {k: v for k, v in spec.items() if k != "name"}
    shards = partition(
        spec["name"], index.classes, num_clients, int(cfg.seed), groups=index.patients, sites=index.sites, **options
    )
    if cfg.federation.mode == "centralized":  # the union of every federated client's splits
        parts = [local_splits(cfg, index, rows[s], int(cfg.seed) + k, f"client_{k:03d}") for k, s in enumerate(shards)]
        return {split: np.sort(np.concatenate([p[split] for p in parts])) for split in SPLITS}
    if not 0 <= source.partition < num_clients:
        raise ConfigError(f"partition id {source.partition} is not a client of this run (0..{num_clients - 1})")
    shard = rows[shards[source.partition]]
    return local_splits(cfg, index, shard, int(cfg.seed) + source.partition, source.site)


def split_counts(records: SiteRecords, splits: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What a site reports: sample counts per split, and per split the count of each class."""
    names = records.class_names
    counts: dict[str, Any] = {split: len(rows) for split, rows in splits.items()}
    counts["num_samples"] = sum(len(rows) for rows in splits.values())
    counts["by_label"] = {
        split: {names[c]: int((records.index.classes[rows] == c).sum()) for c in sorted(names)}
        for split, rows in splits.items()
    }
    sites = {str(s) for s in records.index.sites[np.concatenate(list(splits.values()))] if s is not None}
    counts["source_sites"] = sorted(sites)
    counts.update(records.extra_counts(np.concatenate([splits[s] for s in SPLITS])))
    return counts


def data_fingerprint(cfg: DictConfig, source: ClientSource) -> str:
    """A digest of everything that shapes a client's prepared data: its source, splits, tokenizer."""
    shaping = {
        "data": OmegaConf.to_container(source.cfg.data, resolve=True),
        "seed": int(cfg.seed),
        "num_clients": int(cfg.federation.num_clients),
        "mode": str(cfg.federation.mode),
        "modality": str(cfg.model.modality),
        "text_encoder": OmegaConf.to_container(cfg.model.text_encoder, resolve=True),
        "site": source.site,
        "partition": source.partition,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


ReadSite = Callable[[DictConfig], SiteRecords]
TokenizerLoader = Callable[[], PreTrainedTokenizerBase | None]


def prepare_site(
    read_site: ReadSite, cfg: DictConfig, source: ClientSource, tokenizer: TokenizerLoader, directory: Path
) -> SiteData:
    """Read, validate, split and prepare one client's data into ``directory``.

    Raises:
        DataError: Naming the site (and, from the readers, the file, row or value at fault).
    """
    try:
        records = read_site(source.cfg)
        splits = client_rows(source.cfg, source, records.index)
        if not len(splits["train"]):
            raise DataError("no training samples after the local splits")
        prepared = write_splits(
            directory, records.image_spec, bool(source.cfg.data.image_cache), [(records, splits)], tokenizer()
        )
        records.write_site_files(np.concatenate([splits[s] for s in SPLITS]), directory)
        counts = split_counts(records, splits)
    except DataError as err:
        message = str(err)
        raise DataError(
            message if message.startswith(f"site {source.site}") else f"site {source.site}: {message}"
        ) from err
    return save_site_data(directory, source.site, prepared, counts, data_fingerprint(cfg, source))


def prepare_pooled(read_site: ReadSite, cfg: DictConfig, tokenizer: TokenizerLoader, directory: Path) -> SiteData:
    """The centralized baseline over ``data.sites``: every site's local splits, concatenated.

    This reads every site in one process: it is the pooled baseline federated learning avoids,
    and the one code path that may.
    """
    entries = read_site_entries(cfg.data.sites)
    assert entries is not None
    parts: list[tuple[SiteRecords, dict[str, np.ndarray]]] = []
    counts = []
    for entry in entries:
        site_cfg = site_config(cfg, entry)
        try:
            records = read_site(site_cfg)
            # the seed client_rows gives each site's own client: the same local splits
            splits = local_splits(site_cfg, records.index, np.arange(len(records.index)), int(cfg.seed), entry["name"])
            site_dir = directory / "sites" / entry["name"]
            site_dir.mkdir(parents=True, exist_ok=True)
            records.write_site_files(np.concatenate([splits[s] for s in SPLITS]), site_dir)
        except DataError as err:
            raise DataError(f"site {entry['name']}: {err}") from err
        parts.append((records, splits))
        counts.append(split_counts(records, splits))
    spec = parts[0][0].image_spec
    try:
        prepared = write_splits(directory, spec, bool(cfg.data.image_cache), parts, tokenizer())
    except DataError as err:
        raise DataError(f"pooled baseline: {err}") from err
    fingerprint = data_fingerprint(cfg, ClientSource("pooled", cfg))
    return save_site_data(directory, "pooled", prepared, _sum_counts(counts), fingerprint)


def _sum_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {key: sum(p[key] for p in parts) for key in (*SPLITS, "num_samples")}
    total["by_label"] = {
        split: {name: sum(p["by_label"][split][name] for p in parts) for name in parts[0]["by_label"][split]}
        for split in SPLITS
    }
    total["source_sites"] = sorted({s for p in parts for s in p["source_sites"]})
    return total


def ensure_site_data(
    read_site: ReadSite,
    cfg: DictConfig,
    run_dir: Path,
    partition_id: int,
    tokenizer: TokenizerLoader,
    node_config: Mapping[str, Any] | None = None,
) -> SiteData:
    """Client ``partition_id``'s prepared splits: read from its folder when they match the run's
    config, else prepared now from its own source."""
    directory = RunLayout(run_dir).client_data(partition_id)
    pooled = cfg.federation.mode == "centralized" and cfg.data.sites is not None
    source = ClientSource("pooled", cfg) if pooled else client_source(cfg, partition_id, node_config)
    reusable = reusable_site_data(directory, data_fingerprint(cfg, source))
    if reusable is not None:
        return reusable
    if pooled:
        return prepare_pooled(read_site, cfg, tokenizer, directory)
    return prepare_site(read_site, cfg, source, tokenizer, directory)


def ensure_held_out(
    read_site: ReadSite, cfg: DictConfig, entry: Mapping[str, Any], tokenizer: TokenizerLoader, directory: Path
) -> SiteData:
    """A test set the coordinator may hold (``data.server_test``: a public set, never a site's),
    prepared whole as one test split into ``directory``, or read from there when it matches.

    Raises:
        DataError: Naming ``data.server_test`` (and the file, row or value at fault).
    """
    site_cfg = site_config(cfg, entry)
    fingerprint = data_fingerprint(cfg, ClientSource(str(entry["name"]), site_cfg))
    reusable = reusable_site_data(directory, fingerprint)
    if reusable is not None:
        return reusable
    try:
        records = read_site(site_cfg)
        rows = np.arange(len(records.index))
        splits = {"train": rows[:0], "val": rows[:0], "test": rows}
        cache = bool(site_cfg.data.image_cache)
        prepared = write_splits(directory, records.image_spec, cache, [(records, splits)], tokenizer())
        counts = split_counts(records, splits)
    except DataError as err:
        raise DataError(f"data.server_test: {err}") from err
    return save_site_data(directory, str(entry["name"]), prepared, counts, fingerprint)


__all__ = [
    "SiteRecords",
    "SourceIndex",
    "client_rows",
    "ensure_held_out",
    "ensure_site_data",
    "local_splits",
]
