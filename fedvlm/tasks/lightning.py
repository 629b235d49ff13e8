"""Bring your own Lightning code: a plain LightningModule and LightningDataModule, federated.

``task: lightning`` with ``model.module_class: mypkg.MyModule`` and
``data.datamodule_class: mypkg.MyDataModule`` federates code that knows nothing of fedvlm:

- the server and every client build ``MyModule(**model.module_options)`` (seeded alike);
- each client builds ``MyDataModule(site=entry)`` in its own process, where ``entry`` describes
  its site (:func:`site_entry`), and reads only what that DataModule reads;
- local training is ``trainer.fit`` on its ``train_dataloader()`` with the framework's
  callbacks (weights in and out, FedProx, encoder freeze, the round's learning rate);
- evaluation is Lightning's own ``trainer.validate`` on the site's ``val_dataloader()`` and
  ``test_dataloader()``: what ``validation_step`` logs (``val/acc``, ``val_loss`` ...; the
  ``val`` prefix is dropped) is merged over the sites as sample-weighted sums
  (:class:`LoggedMeans`), exact for means such as a loss or an accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from fedvlm.data.sites import SITE_KEYS, client_source
from fedvlm.errors import ConfigError
from fedvlm.runs import RunLayout
from fedvlm.tasks.base import import_class, mean_of, tasks, write_meta
from fedvlm.tasks.site_store import SPLITS, SiteData

VALIDATION_PREFIXES = ("val/", "val_", "validation/", "validation_")
"""Prefixes a module's ``validation_step`` puts on what it logs; dropped, so that ``val/`` and
``test/`` in ``metrics.jsonl`` name the split evaluated."""


def site_entry(cfg: DictConfig, partition_id: int, node_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a user's DataModule is constructed with: its site's ``name`` and source keys.

    With ``data.sites`` (or a SuperNode's node config): the site's entry over the recipe's
    ``data``; with one source: ``partition_id`` and ``num_partitions`` as well, so that the
    DataModule can read its own part of it.
    """
    source = client_source(cfg, partition_id, node_config)
    data = OmegaConf.to_container(source.cfg.data, resolve=True)
    assert isinstance(data, dict)
    entry: dict[str, Any] = {"name": source.site}
    entry.update({key: data[key] for key in SITE_KEYS if key not in ("synthetic", "synthetic_cxr")})
    if source.partition is not None:
        entry.update(partition_id=source.partition, num_partitions=int(cfg.federation.num_clients))
    return entry


def split_loader(datamodule: L.LightningDataModule, split: str) -> Any | None:
    """The DataModule's loader for ``split``, or None where it defines none (no such split)."""
    hook = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}[split]
    if not is_overridden(hook, datamodule, L.LightningDataModule):
        return None
    return getattr(datamodule, hook)()


def loader_size(loader: Any, what: str) -> int:
    """Samples in ``loader`` (its dataset's length).

    Raises:
        ConfigError: If the dataset has no length (an iterable dataset).
    """
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"{what}: the DataLoader's dataset has no length; federated averaging weighs each client by its "
            "number of samples, so task=lightning needs map-style datasets"
        ) from None


class LoggedMeans(torch.nn.Module):
    """Sample-weighted sums of the values a module logs, mergeable over sites as counts.

    Example:
        >>> site_a, site_b = LoggedMeans(), LoggedMeans()
        >>> site_a.add({"acc": 0.5}, 10)
        >>> site_b.add({"acc": 1.0}, 30)
        >>> site_a.merge_counts(site_b.export_counts())
        >>> site_a.compute()
        {'acc': 0.875}
    """

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, values: Mapping[str, float], num_samples: int) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * num_samples
            self.counts[name] = self.counts.get(name, 0.0) + num_samples

    def export_counts(self) -> dict[str, float]:
        exported = {f"sum/{name}": value for name, value in self.sums.items()}
        exported.update({f"n/{name}": value for name, value in self.counts.items()})
        return exported

    def merge_counts(self, counts: Mapping[str, float]) -> None:
        for key, value in counts.items():
            kind, _, name = key.partition("/")
            target = self.sums if kind == "sum" else self.counts
            target[name] = target.get(name, 0.0) + float(value)

    def compute(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in sorted(self.sums) if self.counts.get(name)}


def _metric_name(key: str) -> str:
    for prefix in VALIDATION_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class LightningTask:
    """A user's LightningModule + LightningDataModule (``task: lightning``)."""

    name = "lightning"
    selection_metric = ""  # evaluation.select_metric names it: a task cannot know what a module logs
    curve_metrics: tuple[str, ...] = ()

    def flip_labels(self, cfg: DictConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ConfigError("task=lightning cannot flip labels (federation.byzantine.attack=label_flip)")

    def reduce_shared(self, key: str, values: Sequence[float]) -> float:
        return mean_of(values)

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        # Both classes are named: config validation refuses task=lightning without them.
        import_class(cfg.model.module_class, L.LightningModule)
        import_class(cfg.data.datamodule_class, L.LightningDataModule, key="data.datamodule_class")
        meta = {"module_class": cfg.model.module_class, "datamodule_class": cfg.data.datamodule_class}
        write_meta(run_dir, meta)
        return meta

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        module_class = import_class(cfg.model.module_class, L.LightningModule)
        options = OmegaConf.to_container(cfg.model.module_options, resolve=True)
        assert isinstance(options, dict)
        module = module_class(**{str(key): value for key, value in options.items()})
        assert isinstance(module, L.LightningModule)
        return module

    def open_site(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, node_config: Mapping[str, Any] | None = None
    ) -> SiteData:
        entry = site_entry(cfg, partition_id, node_config)
        datamodule_class = import_class(cfg.data.datamodule_class, L.LightningDataModule, key="data.datamodule_class")
        datamodule = datamodule_class(site=entry)
        assert isinstance(datamodule, L.LightningDataModule)
        datamodule.prepare_data()
        datamodule.setup("fit")
        counts: dict[str, Any] = {"site": entry["name"]}
        for split in SPLITS:
            loader = split_loader(datamodule, split)
            counts[split] = 0 if loader is None else loader_size(loader, f"site {entry['name']}, {split} split")
        counts.update(num_samples=sum(counts[s] for s in SPLITS), by_label={}, source_sites=[])
        if not counts["train"]:
            raise ConfigError(f"site {entry['name']}: {cfg.data.datamodule_class} has no training samples")
        return SiteData(entry["name"], {}, counts, RunLayout(run_dir).client_data(partition_id), datamodule=datamodule)

    def datamodule(self, cfg: DictConfig, site: SiteData, seed: int) -> L.LightningDataModule:
        assert site.datamodule is not None
        return site.datamodule

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> LoggedMeans:
        return LoggedMeans()

    def evaluate(self, module: L.LightningModule, batches: Iterable[Any], metrics: torch.nn.Module) -> None:
        assert isinstance(metrics, LoggedMeans)
        num_samples = loader_size(batches, "evaluation")
        if not num_samples:
            return
        trainer = L.Trainer(
            accelerator="gpu" if module.device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        (logged,) = trainer.validate(module, dataloaders=batches, verbose=False)
        metrics.add({_metric_name(k): float(v) for k, v in logged.items()}, num_samples)

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        assert isinstance(metrics, LoggedMeans)
        return metrics.compute()

    def round_callbacks(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int, site: SiteData
    ) -> list[L.Callback]:
        return []

    def open_server_test(self, cfg: DictConfig, run_dir: Path) -> SiteData | None:
        return None  # config validation refuses data.server_test: the coordinator has no DataModule


tasks.register("lightning")(LightningTask)

__all__ = ["LightningTask", "LoggedMeans", "site_entry"]
