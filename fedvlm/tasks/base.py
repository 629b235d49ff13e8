"""The :class:`Task` interface and its registry."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from fedvlm.data.sites import server_test_entry
from fedvlm.errors import ConfigError
from fedvlm.models.encoders import tokenizer_source
from fedvlm.models.tokenizer import build_word_tokenizer, load_tokenizer
from fedvlm.registry import Registry
from fedvlm.runs import RunLayout, load_checkpoint
from fedvlm.tasks.site import SiteRecords, ensure_held_out, ensure_site_data
from fedvlm.tasks.site_store import SiteData


class Task(Protocol):
    """What the round loop needs from a problem (leukemia staging, CXR contrastive, a user's
    LightningModule + LightningDataModule).

    The coordinator calls :meth:`prepare` (config-derived files only); each client calls
    :meth:`open_site` for its own data, in its own process, and trains from
    :meth:`datamodule`'s loaders; evaluation goes through :meth:`evaluate` into mergeable metrics.

    Attributes:
        name: Registry name, the ``task`` config value.
        selection_metric: The metric (without split prefix) that selects ``best.ckpt``, higher is
            better, read from the merged ``val/`` (default) or ``test/`` values;
            ``evaluation.select_metric`` overrides it (:func:`selection_key`).
        curve_metrics: The ``metrics.jsonl`` keys plotted in ``curves.png``.
    """

    name: str
    selection_metric: str
    curve_metrics: tuple[str, ...]

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        """Write what the coordinator may hold: the tokenizer (never built from a site's reports),
        prompts, and ``RUN_DIR/data/meta.json`` (vocabulary size, label names). Reads no data.

        Returns:
            The facts saved to ``meta.json``.
        """
        ...

    def open_site(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, node_config: Mapping[str, Any] | None = None
    ) -> SiteData:
        """Client ``partition_id``'s own data (the site its node config or ``data.sites`` entry
        names, or its partition of one source), read in this process only.

        Raises:
            DataError: Naming the site (and the file, row or value at fault).
        """
        ...

    def datamodule(self, cfg: DictConfig, site: SiteData, seed: int) -> L.LightningDataModule:
        """The site's loaders; ``seed`` orders the training split (one value per client and round)."""
        ...

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        """A freshly initialised module for this run (seeded by the caller)."""
        ...

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> torch.nn.Module:
        """Fresh metrics; ``mergeable`` ones hold only sum-reduced counts (they can leave a client)."""
        ...

    def evaluate(self, module: L.LightningModule, batches: Iterable[Any], metrics: torch.nn.Module) -> None:
        """Update ``metrics`` with ``module``'s predictions on ``batches`` (a DataLoader)."""
        ...

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        """Scalar values of ``metrics`` (names without prefix)."""
        ...

    def round_callbacks(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int, site: SiteData
    ) -> list[L.Callback]:
        """Extra Lightning callbacks for one client's local round (e.g. explanations). A callback
        with a ``shareable_metrics()`` method contributes those aggregates to the client's reply."""
        ...

    def open_server_test(self, cfg: DictConfig, run_dir: Path) -> SiteData | None:
        """The coordinator's own test set (``data.server_test``, a public set), prepared under
        ``RUN_DIR/data/server_test`` on first use; None without one."""
        ...

    def flip_labels(self, cfg: DictConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of a training split's tensors with every label flipped (the ``label_flip``
        attack asks the task, so the attack knows no labels); other tensors shared, not copied.

        Raises:
            ConfigError: If the task cannot flip its labels (a user's DataModule).
        """
        ...

    def reduce_shared(self, key: str, values: Sequence[float]) -> float:
        """One round value of the shareable aggregate ``key`` from the clients that sent it
        (e.g. explanation quality: maxima stay maxima, counts add up)."""
        ...


def mean_of(values: Sequence[float]) -> float:
    """The default reduction of a shared aggregate over clients: their mean."""
    return sum(values) / len(values)


class PreparedSites:
    """The data side of the built-in tasks: each client reads its records (``read_site``),
    splits and prepares them in its own folder (:mod:`fedvlm.tasks.site`), and streams them
    through a :class:`~fedvlm.data.datamodule.SiteDataModule`."""

    def read_site(self, cfg: DictConfig) -> SiteRecords:
        """The records of the one source ``cfg.data`` names (a site's config), indexed and
        validated, images not yet decoded.

        Raises:
            DataError: Naming the file, row or value at fault.
        """
        raise NotImplementedError

    def reduce_shared(self, key: str, values: Sequence[float]) -> float:
        return mean_of(values)

    def open_site(
        self, cfg: DictConfig, run_dir: Path, partition_id: int, node_config: Mapping[str, Any] | None = None
    ) -> SiteData:
        return ensure_site_data(
            self.read_site, cfg, run_dir, partition_id, lambda: run_tokenizer(cfg, run_dir), node_config
        )

    def open_server_test(self, cfg: DictConfig, run_dir: Path) -> SiteData | None:
        entry = server_test_entry(cfg)
        if entry is None:
            return None
        directory = RunLayout(run_dir).server_test
        return ensure_held_out(self.read_site, cfg, entry, lambda: run_tokenizer(cfg, run_dir), directory)

    def datamodule(self, cfg: DictConfig, site: SiteData, seed: int) -> L.LightningDataModule:
        from fedvlm.data.datamodule import SiteDataModule

        trainer = cfg.trainer
        return SiteDataModule(site.splits, trainer.batch_size, trainer.num_workers, cfg.data.augment, seed=seed)


def selection_key(task: Task, cfg: DictConfig) -> str:
    """The ``metrics.jsonl`` key that selects ``best.ckpt``: ``<evaluation.select_on>/<metric>``.

    Raises:
        ConfigError: If neither the task nor ``evaluation.select_metric`` names a metric.
    """
    metric = _selection_metric(task, cfg)
    if not metric:
        raise ConfigError(f"task={task.name} has no selection metric: set evaluation.select_metric")
    return f"{cfg.evaluation.select_on}/{metric}"


def curve_keys(task: Task, cfg: DictConfig) -> tuple[str, ...]:
    """The ``metrics.jsonl`` keys of the live display and ``curves.png``: the task's, else the
    selection metric on the test and validation splits."""
    if task.curve_metrics:
        return task.curve_metrics
    metric = _selection_metric(task, cfg)
    return (f"test/{metric}", f"val/{metric}") if metric else ()


def _selection_metric(task: Task, cfg: DictConfig) -> str:
    return str(cfg.evaluation.select_metric or task.selection_metric)


tasks: Registry[Task] = Registry("task")


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The prepared-data facts saved by :meth:`Task.prepare`."""
    path = RunLayout(run_dir).meta
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run directory was not prepared")
    return json.loads(path.read_text())


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    path = RunLayout(run_dir).meta
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2))


def import_class(dotted: str, base: type, key: str = "model.module_class") -> type:
    """Import ``package.module.ClassName`` (the value of config ``key``) and check it subclasses ``base``.

    Raises:
        ConfigError: If it cannot be imported or is not a subclass of ``base``, naming ``key``.
    """
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}={dotted!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}={dotted!r} is not a subclass of {base.__name__}")
    return cls


def module_class(cfg: DictConfig, default: type) -> type:
    """The LightningModule class of a run: ``model.module_class`` (a subclass of ``default``) or
    ``default`` itself.

    Raises:
        ConfigError: If ``model.module_class`` cannot be imported or does not subclass ``default``.
    """
    return import_class(cfg.model.module_class, default) if cfg.model.module_class else default


PUBLIC_VOCABULARY = Path(__file__).resolve().parent.parent / "resources" / "wordpiece_uncased_vocab.txt"
"""BERT-base (uncased) WordPiece vocabulary shipped with the package: the default of a random-init
text encoder on real data."""


def make_tokenizer(cfg: DictConfig, run_dir: Path, public_texts: Sequence[str] = ()) -> PreTrainedTokenizerBase | None:
    """The run's tokenizer, saved to ``RUN_DIR/tokenizer`` (None for an image-only model).

    Never built from the sites' reports. In order: the text encoder's own tokenizer (hub id or
    local path); a WordPiece vocabulary file ``model.text_encoder.vocabulary`` (BERT ``vocab.txt``
    format); a word tokenizer over ``public_texts`` (a synthetic generator's public template
    vocabulary and the recipe's prompts); the BERT-base uncased vocabulary shipped with fedvlm.

    Raises:
        ConfigError: If the vocabulary file is missing.
    """
    if cfg.model.modality == "image":
        return None
    encoder = cfg.model.text_encoder
    source = tokenizer_source(encoder)
    tokenizer: PreTrainedTokenizerBase
    if source:
        tokenizer = load_tokenizer(source)
    elif encoder.vocabulary or not public_texts:
        vocabulary = Path(encoder.vocabulary).expanduser() if encoder.vocabulary else PUBLIC_VOCABULARY
        if not vocabulary.is_file():
            raise ConfigError(f"model.text_encoder.vocabulary={str(vocabulary)!r}: no such file (a BERT vocab.txt)")
        from transformers import BertTokenizer  # tokenizers-backed (fast) in transformers 5

        tokenizer = BertTokenizer(vocab=str(vocabulary), do_lower_case=True)
    else:
        tokenizer = build_word_tokenizer(iter(public_texts))
    tokenizer.save_pretrained(str(RunLayout(run_dir).tokenizer))
    return tokenizer


def run_tokenizer(cfg: DictConfig, run_dir: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer the coordinator saved for the run (None for an image-only model)."""
    return None if cfg.model.modality == "image" else load_run_tokenizer(run_dir)


def load_run_tokenizer(run_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a run was prepared with."""
    return load_tokenizer(str(RunLayout(run_dir).tokenizer))


def is_synthetic(data: DictConfig) -> bool:
    """Whether ``data`` (the recipe's, or a site's) names the built-in generator."""
    return data.format == "synthetic" and data.root is None


def synthetic_everywhere(cfg: DictConfig) -> bool:
    """Whether every site of the run reads the built-in generator (so its public vocabulary covers them)."""
    from fedvlm.data.sites import read_site_entries, site_config

    entries = read_site_entries(cfg.data.sites)
    if entries is None:
        return is_synthetic(cfg.data)
    return all(is_synthetic(site_config(cfg, entry).data) for entry in entries)


CHECKPOINTS = ("last", "best")


def load_trained_module(run_dir: Path, cfg: DictConfig, checkpoint: str = "last") -> L.LightningModule:
    """The run's module with the weights of ``checkpoints/<checkpoint>.ckpt``.

    Raises:
        ConfigError: If the checkpoint is missing (the run never completed a round).
    """
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"--checkpoint {checkpoint!r} is not one of: {', '.join(CHECKPOINTS)}")
    path = RunLayout(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run has not completed a round")
    from fedvlm.tasks import get_task

    task = get_task(cfg.task)
    L.seed_everything(int(cfg.seed), verbose=False)
    module = task.build_module(cfg, run_dir)
    module.load_state_dict(load_checkpoint(path)["state_dict"])
    module.eval()
    return module
