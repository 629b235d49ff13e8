"""The :class:`Task` interface and its registry."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from fedvlm.data.partition import split_train_test
from fedvlm.errors import ConfigError, DataError
from fedvlm.models.encoders import tokenizer_source
from fedvlm.models.tokenizer import build_word_tokenizer, load_tokenizer
from fedvlm.registry import Registry

DATA_DIR = "data"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
CLIENTS_DIR = "clients"


def client_dir(run_dir: Path, partition_id: int) -> Path:
    """A client's own folder in the run directory (site-local outputs such as explanations)."""
    return run_dir / CLIENTS_DIR / f"client_{partition_id:03d}"


class Task(Protocol):
    """What the round loop needs from a problem (leukemia staging, CXR contrastive, ...).

    Attributes:
        name: Registry name, the ``task`` config value.
        selection_metric: The ``metrics.jsonl`` key that selects ``best.ckpt`` (higher is better).
        curve_metrics: The ``metrics.jsonl`` keys plotted in ``curves.png``.
        per_sample_files: JSON files in ``RUN_DIR/data/`` keyed by sample index; a site export
            keeps only its own samples' entries.
    """

    name: str
    selection_metric: str
    curve_metrics: tuple[str, ...]
    per_sample_files: tuple[str, ...]

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
        """Load, split and partition the data; write ``RUN_DIR/data/`` and ``partition.json``.

        Returns:
            Facts about the prepared data (sizes per client, vocabulary size ...), also saved
            to ``RUN_DIR/data/meta.json``.
        """
        ...

    def build_module(self, cfg: DictConfig, run_dir: Path) -> L.LightningModule:
        """A freshly initialised module for this run (seeded by the caller)."""
        ...

    def load_client(self, run_dir: Path, partition_id: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The (train, local validation) bundles of one client."""
        ...

    def load_test(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """The server's held-out test bundle (no client trains on it)."""
        ...

    def make_metrics(self, cfg: DictConfig, mergeable: bool) -> torch.nn.Module:
        """Fresh metrics; ``mergeable`` ones hold only sum-reduced counts (they can leave a client)."""
        ...

    def evaluate(
        self, module: L.LightningModule, bundle: dict[str, torch.Tensor], metrics: torch.nn.Module, batch_size: int
    ) -> None:
        """Update ``metrics`` with ``module``'s predictions on ``bundle``."""
        ...

    def scalar_metrics(self, metrics: torch.nn.Module) -> dict[str, float]:
        """Scalar values of ``metrics`` (names without prefix)."""
        ...

    def round_callbacks(self, cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int) -> list[L.Callback]:
        """Extra Lightning callbacks for one client's local round (e.g. explanations). A callback
        with a ``shareable_metrics()`` method contributes those aggregates to the client's reply."""
        ...


tasks: Registry[Task] = Registry("task")


def read_meta(run_dir: Path) -> dict[str, Any]:
    """The prepared-data facts saved by :meth:`Task.prepare`."""
    path = run_dir / DATA_DIR / META_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run directory was not prepared")
    return json.loads(path.read_text())


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    path = run_dir / DATA_DIR / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2))


def import_class(dotted: str, base: type) -> type:
    """Import ``package.module.ClassName`` and check it subclasses ``base``.

    Raises:
        ConfigError: If it cannot be imported or is not a subclass of ``base``.
    """
    module_name, _, class_name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"model.module_class={dotted!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"model.module_class={dotted!r} is not a subclass of {base.__name__}")
    return cls


def make_tokenizer(cfg: DictConfig, texts: Sequence[str], run_dir: Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved to ``RUN_DIR/tokenizer``: the text encoder's own (hub id or local
    path), or a word tokenizer built from ``texts`` (the training reports) for a random-init encoder."""
    source = tokenizer_source(cfg.model.text_encoder)
    tokenizer = load_tokenizer(source) if source else build_word_tokenizer(iter(texts))
    tokenizer.save_pretrained(str(run_dir / TOKENIZER_DIR))
    return tokenizer


def local_split(
    classes: np.ndarray, patients: np.ndarray, indices: np.ndarray, val_fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples into local train and validation (by patient, stratified)."""
    if val_fraction <= 0 or len(np.unique(patients[indices])) < 4:
        return indices, indices[:0]
    try:
        train_rows, val_rows = split_train_test(classes[indices], patients[indices], val_fraction, seed)
    except DataError as err:
        raise DataError(
            f"client {client}: cannot split its {len(indices)} samples into local train/validation ({err}); "
            "set data.val_fraction=0 or give the client more data"
        ) from None
    return indices[train_rows], indices[val_rows]


def client_shard_path(run_dir: Path, partition_id: int, split: str) -> Path:
    """``RUN_DIR/data/client_NNN_{train,val}.pt``: one client's prepared shard."""
    return run_dir / DATA_DIR / f"client_{partition_id:03d}_{split}.pt"


def test_shard_path(run_dir: Path) -> Path:
    """``RUN_DIR/data/test.pt``: the server's held-out test set."""
    return run_dir / DATA_DIR / "test.pt"


def save_shards(
    cfg: DictConfig,
    run_dir: Path,
    everything: dict[str, torch.Tensor],
    test_idx: np.ndarray,
    client_indices: Sequence[np.ndarray],
    classes: np.ndarray,
    patients: np.ndarray,
) -> list[dict[str, int]]:
    """Write the test set and every client's local train/validation shards (split by patient).

    Returns:
        Per client ``{"train": n, "val": n}``.
    """
    from fedvlm.data.prepared import save_bundle, subset

    save_bundle(subset(everything, test_idx), test_shard_path(run_dir))
    sizes = []
    for client, indices in enumerate(client_indices):
        local_train, local_val = local_split(
            classes, patients, indices, cfg.data.val_fraction, cfg.seed + client, client
        )
        save_bundle(subset(everything, local_train), client_shard_path(run_dir, client, "train"))
        save_bundle(subset(everything, local_val), client_shard_path(run_dir, client, "val"))
        sizes.append({"train": len(local_train), "val": len(local_val)})
    return sizes


def load_client_shards(run_dir: Path, partition_id: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One client's (train, local validation) shards."""
    from fedvlm.data.prepared import load_bundle

    return (
        load_bundle(client_shard_path(run_dir, partition_id, "train")),
        load_bundle(client_shard_path(run_dir, partition_id, "val")),
    )
