"""The run directory: resolved config, per-round metrics, checkpoints and curves.

Layout (``runs/<recipe>-<timestamp>/`` by default)::

    config.yaml          fully resolved config (``fedvlm fit --recipe RUN/config.yaml`` repeats it)
    metrics.jsonl        one JSON object per completed round
    partition.json       per-client sample counts (train/val/test, by label), as the sites report them
    checkpoints/last.ckpt, checkpoints/best.ckpt
    curves.png           accuracy, AUROC and stage macro-F1 over rounds
    data/, tokenizer/    meta.json (vocabulary size, labels), CXR prompts; the tokenizer
    clients/client_NNN/  each client's own folder: data/ (its prepared splits and counts,
                         written by the client), explanations/, privacy/
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
CURVES_FILE = "curves.png"


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
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` atomically with ``rows`` (used after every round and on resume)."""
    path = run_dir / METRICS_FILE
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
    path = run_dir / CURVES_FILE
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
