"""The run directory: every path in it, and the files the coordinator writes there.

:class:`RunLayout` is the one owner of the layout (``runs/<recipe>-<timestamp>/`` by default)::

    config.yaml          fully resolved config (``fedvlm fit --recipe RUN/config.yaml`` repeats it)
    metrics.jsonl        one JSON object per completed round
    partition.json       per-client sample counts (train/val/test, by label), as the sites report them
    checkpoints/last.ckpt, checkpoints/best.ckpt
    curves.png           accuracy, AUROC and stage macro-F1 over rounds
    data/                meta.json (vocabulary size, labels), prompts.pt (CXR), server_test/
    tokenizer/           the tokenizer every process loads
    clients/client_NNN/  each client's own folder: data/ (its prepared splits and counts,
                         written by the client), explanations/, privacy/accountant.pt
    eval/                ``fedvlm evaluate`` (leave-one-hospital-out runs under eval/loho/)
    explanations/        ``fedvlm explain``
    site.json            a site's copy made by ``fedvlm deploy export-site`` (its partition id)

Everything else takes a run directory and asks its layout for a path, so a name is written once.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

CLIENT_PREFIX = "client_"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created or read).

    Example:
        >>> run = RunLayout(Path("runs/demo"))
        >>> run.client_data(3).as_posix(), run.checkpoint("best").as_posix()
        ('runs/demo/clients/client_003/data', 'runs/demo/checkpoints/best.ckpt')
        >>> run.ledger(3).relative_to(run.root).as_posix()
        'clients/client_003/privacy/accountant.pt'
    """

    root: Path

    @property
    def config(self) -> Path:
        """The fully resolved config of the run."""
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON row per completed round."""
        return self.root / "metrics.jsonl"

    @property
    def partition(self) -> Path:
        """The clients' sample counts, as they reported them."""
        return self.root / "partition.json"

    @property
    def curves(self) -> Path:
        """The metric curves over rounds."""
        return self.root / "curves.png"

    @property
    def checkpoints(self) -> Path:
        """The folder of ``last.ckpt`` and ``best.ckpt``."""
        return self.root / "checkpoints"

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.ckpt`` (``last`` or ``best``)."""
        return self.checkpoints / f"{name}.ckpt"

    @property
    def data(self) -> Path:
        """What the coordinator keeps of the data: counts and metadata, never a sample."""
        return self.root / "data"

    @property
    def meta(self) -> Path:
        """Vocabulary size, label names and the other facts every process needs."""
        return self.data / "meta.json"

    @property
    def prompts(self) -> Path:
        """The tokenized zero-shot prompts (task ``cxr``)."""
        return self.data / "prompts.pt"

    @property
    def server_test(self) -> Path:
        """The prepared test set the coordinator may hold (``data.server_test``)."""
        return self.data / "server_test"

    @property
    def tokenizer(self) -> Path:
        """The tokenizer every process loads."""
        return self.root / "tokenizer"

    @property
    def clients(self) -> Path:
        """The folder of the clients' own folders."""
        return self.root / "clients"

    def client(self, partition_id: int) -> Path:
        """A client's own folder (its prepared data, explanations, privacy ledger)."""
        return self.clients / f"{CLIENT_PREFIX}{partition_id:03d}"

    def client_data(self, partition_id: int) -> Path:
        """The client's prepared splits and counts, written by the client."""
        return self.client(partition_id) / "data"

    def client_explanations(self, partition_id: int) -> Path:
        """The client's per-patient explanations, one folder per round."""
        return self.client(partition_id) / "explanations"

    def ledger(self, partition_id: int) -> Path:
        """The client's DP-SGD privacy ledger."""
        return self.client(partition_id) / "privacy" / "accountant.pt"

    def client_data_folders(self) -> list[tuple[int, Path]]:
        """``(partition id, data folder)`` of every client that has one, in partition order."""
        folders = self.clients.glob(f"{CLIENT_PREFIX}*/data")
        return sorted((int(f.parent.name.removeprefix(CLIENT_PREFIX)), f) for f in folders if f.is_dir())

    @property
    def evaluation(self) -> Path:
        """``fedvlm evaluate``'s reports."""
        return self.root / "eval"

    def held_out_run(self, hospital: int) -> Path:
        """The leave-one-hospital-out run that leaves ``hospital`` out."""
        return self.evaluation / "loho" / f"hospital_{hospital:03d}"

    @property
    def explanations(self) -> Path:
        """``fedvlm explain``'s default output."""
        return self.root / "explanations"

    @property
    def site_file(self) -> Path:
        """In a site's exported copy: which partition it is."""
        return self.root / "site.json"


def new_run_dir(recipe: str, root: Path = Path("runs")) -> Path:
    """A fresh ``runs/<recipe>-<YYYYmmdd-HHMMSS>`` directory (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{recipe}-{stamp}"
    suffix = 1
    while candidate.exists():
        candidate = root / f"{recipe}-{stamp}-{suffix}"
        suffix += 1
    candidate.mkdir(parents=True)
    return candidate


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds recorded in ``metrics.jsonl`` (empty if none yet)."""
    path = RunLayout(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``rows`` (used after every round and on resume)."""
    path = RunLayout(run_dir).metrics
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(jsonable(row)) + "\n" for row in rows))
    os.replace(tmp, path)


def save_checkpoint(
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    hyper_parameters: Mapping[str, Any],
    fedvlm_state: Mapping[str, Any],
) -> None:
    """Write a checkpoint that ``LightningModule.load_from_checkpoint`` understands.

    ``fedvlm_state`` (round, history, best value ...) rides along under the ``"fedvlm"`` key
    and is what ``fedvlm fit --resume`` reads. Written atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "hyper_parameters": dict(hyper_parameters),
        "pytorch-lightning_version": L.__version__,
        "fedvlm": dict(fedvlm_state),
    }
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`."""
    return torch.load(path, map_location="cpu", weights_only=False)


def plot_curves(run_dir: Path, rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> Path:
    """Plot ``keys`` over rounds into ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [row["round"] for row in rows]
    for key in keys:
        values = [row.get(key, math.nan) for row in rows]
        ax.plot(rounds, values, marker="o", markersize=3, label=key)
    ax.set_xlabel("round")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = RunLayout(run_dir).curves
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def jsonable(value: Any) -> Any:
    """``value`` with tensors as lists and non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_partition_summary(run_dir: Path, counts: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``RUN_DIR/partition.json`` from the counts the sites reported: per client its site, its
    train / val / test sizes, ``num_samples`` (their sum) and counts per label; and the test total.
    Only counts: nothing per sample reaches the coordinator."""
    clients = []
    for pid, site in sorted(counts.items()):
        by_split = site["by_label"]
        labels = list(next(iter(by_split.values()))) if by_split else []
        entry = {
            "client": pid,
            "site": site["site"],
            "train": int(site["train"]),
            "val": int(site["val"]),
            "test": int(site["test"]),
            "num_samples": int(site["train"]) + int(site["val"]) + int(site["test"]),
            "by_label": {name: sum(int(split[name]) for split in by_split.values()) for name in labels},
            "by_split": by_split,
            "sites": site.get("source_sites", []),
        }
        entry.update({k: v for k, v in site.items() if k in ("positives_by_label", "skipped")})
        clients.append(entry)
    test_labels: dict[str, int] = {}
    for site in counts.values():
        for name, count in site["by_label"].get("test", {}).items():
            test_labels[name] = test_labels.get(name, 0) + int(count)
    summary = {
        "clients": clients,
        "test": {"num_samples": sum(int(c["test"]) for c in counts.values()), "by_label": test_labels},
    }
    RunLayout(run_dir).partition.write_text(json.dumps(summary, indent=2))
    return summary
