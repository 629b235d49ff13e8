"""Evaluation of a trained chest X-ray model beyond the rounds' metrics: exact zero-shot
classification and retrieval per site and pooled, and few-shot linear probes on frozen image
features (what ``fedvlm evaluate`` reports, :mod:`fedvlm.commands.evaluate`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from fedvlm.data.prepared import Samples, bundle_size, make_loader
from fedvlm.errors import ConfigError
from fedvlm.evaluation.metrics import export_state, merge_states
from fedvlm.tasks import get_task
from fedvlm.tasks.base import read_meta
from fedvlm.tasks.cxr.metrics import linear_probe_auroc
from fedvlm.tasks.site_store import load_site_data, site_data_folders


def set_evaluation_prompts(module: L.LightningModule, cfg: DictConfig, run_dir: Path) -> None:
    """Re-tokenize the prompts with the run's tokenizer, so ``evaluation.prompts`` given at
    evaluation time take effect."""
    from fedvlm.tasks.base import load_run_tokenizer
    from fedvlm.tasks.cxr.task import prompt_sets, tokenize_prompts

    if cfg.task != "cxr" or getattr(module, "modality", "") != "fused":
        return
    names = read_meta(run_dir)["label_names"]
    tokens = tokenize_prompts(
        load_run_tokenizer(run_dir), prompt_sets(cfg, names), names, int(cfg.data.max_text_length)
    )
    module.set_prompts(tokens["input_ids"].long(), tokens["attention_mask"].long())  # type: ignore[operator]


def classification_and_retrieval(module: L.LightningModule, cfg: DictConfig, bundle: Samples) -> dict[str, float]:
    """Exact (non-binned) multi-label metrics and retrieval recalls of ``module`` on ``bundle``."""
    task = get_task(cfg.task)
    metrics = task.make_metrics(cfg, mergeable=False)
    task.evaluate(module, make_loader(bundle, int(cfg.trainer.batch_size), shuffle=False), metrics)
    return task.scalar_metrics(metrics)


@torch.no_grad()
def image_features(module: L.LightningModule, bundle: Samples, batch_size: int) -> np.ndarray:
    """Image-tower features ``[N, D]`` (before projection) of every image in ``bundle``."""
    features = [
        module.image_features(batch["image"].to(module.device)).float().cpu()  # type: ignore[operator]
        for batch in make_loader(bundle, batch_size, shuffle=False)
    ]
    return torch.cat(features).numpy() if features else np.zeros((0, 0), dtype=np.float32)


def few_shot(
    module: L.LightningModule,
    cfg: DictConfig,
    train: Samples,
    test: Samples,
    shots: Sequence[int],
    seeds: int,
) -> dict[str, Any]:
    """k-shot linear probes on frozen image features, ``seeds`` draws per k.

    Returns:
        ``{"k": {"macro_auroc_mean", "macro_auroc_std", "per_label": {...}, "seeds": n}}``.
    """
    batch_size = int(cfg.trainer.batch_size)
    train_x, test_x = image_features(module, train, batch_size), image_features(module, test, batch_size)
    train_y, test_y = train["labels"].numpy(), test["labels"].numpy()
    names: Sequence[str] = module.label_names  # type: ignore[assignment]
    result: dict[str, Any] = {}
    for k in shots:
        runs = [linear_probe_auroc(train_x, train_y, test_x, test_y, k, seed) for seed in range(seeds)]
        macro = [float(np.mean(list(r.values()))) for r in runs if r]
        per_label = {
            names[label]: float(np.mean([r[label] for r in runs if label in r]))
            for label in sorted({label for r in runs for label in r})
        }
        result[str(k)] = {
            "macro_auroc_mean": float(np.mean(macro)) if macro else float("nan"),
            "macro_auroc_std": float(np.std(macro)) if macro else float("nan"),
            "per_label": per_label,
            "seeds": len(macro),
        }
    return result


def few_shot_per_site(
    module: L.LightningModule, cfg: DictConfig, run_dir: Path, shots: Sequence[int], seeds: int
) -> dict[str, Any]:
    """:func:`few_shot` probes at every site (trained on its train split, tested on its test
    split), and per k the mean over the sites that could fit one.

    Returns:
        ``{"k": {"macro_auroc_mean", "macro_auroc_std", "per_label", "seeds", "sites", "per_site"}}``:
        mean and std over sites of each site's mean over seeds.
    """
    per_site: dict[str, dict[str, Any]] = {}
    for _, folder in site_data_folders(run_dir):
        site = load_site_data(folder)
        if bundle_size(site.train) and bundle_size(site.test):
            per_site[site.site] = few_shot(module, cfg, site.train, site.test, shots, seeds)
        del site
    result: dict[str, Any] = {}
    for k in shots:
        values = {name: r[str(k)] for name, r in per_site.items() if not math.isnan(r[str(k)]["macro_auroc_mean"])}
        means = [v["macro_auroc_mean"] for v in values.values()]
        labels = sorted({label for v in values.values() for label in v["per_label"]})
        result[str(k)] = {
            "macro_auroc_mean": float(np.mean(means)) if means else float("nan"),
            "macro_auroc_std": float(np.std(means)) if means else float("nan"),
            "per_label": {
                label: float(np.mean([v["per_label"][label] for v in values.values() if label in v["per_label"]]))
                for label in labels
            },
            "seeds": seeds,
            "sites": len(means),
            "per_site": {name: v["macro_auroc_mean"] for name, v in values.items()},
        }
    return result


def per_site_test_metrics(module: L.LightningModule, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Test metrics merged over the sites (from counts) and per site (exact AUROC).

    Returns:
        ``{"pooled": scalars, "per_site": {site: scalars}, "num_test": n}``.
    """
    task = get_task(cfg.task)
    pooled = task.make_metrics(cfg, mergeable=True)
    per_site: dict[str, dict[str, float]] = {}
    num_test = 0
    for folder_pid, folder in site_data_folders(run_dir):
        site = load_site_data(folder)  # one site's split in memory at a time
        if not bundle_size(site.test):
            continue
        num_test += bundle_size(site.test)
        counts = task.make_metrics(cfg, mergeable=True)
        task.evaluate(module, make_loader(site.test, int(cfg.trainer.batch_size), shuffle=False), counts)
        merge_states(pooled, [export_state(counts)])
        per_site[site.site] = classification_and_retrieval(module, cfg, site.test) | {
            "client": folder_pid,
            "num_test": bundle_size(site.test),
        }
        del site
    if not num_test:
        raise ConfigError(f"no site of {run_dir} has a test split (data.test_fraction=0?)")
    return {"pooled": task.scalar_metrics(pooled), "per_site": per_site, "num_test": num_test}
