"""``fedvlm evaluate RUN_DIR``: zero-shot, retrieval, few-shot and leave-one-hospital-out evaluation.

Results go to ``RUN_DIR/eval/`` as JSON (``zero_shot.json``, ``retrieval.json``,
``few_shot.json``, ``loho.json``) plus ``summary.md``, a markdown table of everything there.

Evaluation reads the sites' prepared splits (``RUN_DIR/clients/client_NNN/data``, as a
simulation leaves them), **one site at a time**: each site's split is scored on its own and
contributes only mergeable counts (binned AUROC state, retrieval hits) to the pooled values, so
nothing per-sample of one site meets another's. Retrieval is within each site's gallery;
few-shot probes train and test on one site's splits and are averaged over sites.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console

from fedvlm.config import load_config, load_run_config, save_config
from fedvlm.data.prepared import Samples, bundle_size, make_loader
from fedvlm.errors import ConfigError
from fedvlm.evaluation.metrics import AUROC_BINS, export_state, merge_states
from fedvlm.runs import RunLayout, jsonable
from fedvlm.tasks import get_task
from fedvlm.tasks.base import load_trained_module, read_meta
from fedvlm.tasks.cxr.metrics import linear_probe_auroc
from fedvlm.tasks.site_store import client_bundle, client_site, load_site_data, site_data_folders


def _set_prompts(module: L.LightningModule, cfg: DictConfig, run_dir: Path) -> None:
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


def leave_one_hospital_out(
    run_dir: Path,
    cfg: DictConfig,
    hospitals: Sequence[int] | None,
    rounds: int | None,
    console: Console,
    checkpoint: str = "last",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """For each held-out hospital: train the same federation without it, test on its data.

    Each federation runs in ``RUN_DIR/eval/loho/hospital_NNN/`` on the sites' prepared data
    (``federation.exclude_clients=[h]``) and is scored with its last round's model on all of the
    held-out hospital's data. The full
    run's model (``checkpoint``), which trained on that hospital, is scored on the same data for
    comparison, with the same ``evaluation.*`` overrides.
    """
    from fedvlm.federation.simulation import simulate

    num_clients = int(cfg.federation.num_clients)
    if cfg.federation.mode == "centralized" or num_clients < 2:
        raise ConfigError("leave-one-hospital-out needs a federated run with at least 2 clients")
    chosen = list(range(num_clients)) if not hospitals else list(hospitals)
    bad = [h for h in chosen if not 0 <= h < num_clients]
    if bad:
        raise ConfigError(f"--hospitals {bad}: this run has clients 0..{num_clients - 1}")
    full_model = load_trained_module(run_dir, cfg, checkpoint)
    _set_prompts(full_model, cfg, run_dir)
    result: dict[str, Any] = {}
    for hospital in chosen:
        loho_dir = RunLayout(run_dir).held_out_run(hospital)
        if loho_dir.exists():
            shutil.rmtree(loho_dir)
        loho_dir.mkdir(parents=True)
        run, loho = RunLayout(run_dir), RunLayout(loho_dir)
        for shared, link in ((run.data, loho.data), (run.tokenizer, loho.tokenizer)):  # not copies
            if shared.exists():
                os.symlink(shared.resolve(), link)
        for pid, folder in site_data_folders(run_dir):  # each site's prepared data, where it is
            link = loho.client_data(pid)
            link.parent.mkdir(parents=True)
            os.symlink(folder.resolve(), link)
        loho_overrides = [*overrides, f"federation.exclude_clients=[{hospital}]"]
        loho_overrides += [f"federation.rounds={rounds}"] if rounds else []
        loho_cfg = load_config(RunLayout(run_dir).config, loho_overrides)
        save_config(loho_cfg, RunLayout(loho_dir).config)
        console.print(f"leave-one-hospital-out: hospital {hospital} held out ({loho_cfg.federation.rounds} rounds)")
        simulate(loho_cfg, loho_dir)
        held_out = client_bundle(run_dir, hospital)
        model = load_trained_module(loho_dir, loho_cfg)
        _set_prompts(model, loho_cfg, loho_dir)
        site = client_site(run_dir, hospital)
        result[str(hospital)] = {
            "site": site.site,
            "sites": site.counts.get("source_sites", []),
            "num_samples": bundle_size(held_out),
            "held_out": classification_and_retrieval(model, loho_cfg, held_out),
            "trained_on": classification_and_retrieval(full_model, cfg, held_out),
        }
    return result


def evaluate_run(
    run_dir: Path,
    overrides: Sequence[str] = (),
    zero_shot: bool = True,
    retrieval: bool = True,
    few_shot_k: Sequence[int] | None = None,
    loho: bool = False,
    hospitals: Sequence[int] | None = None,
    loho_rounds: int | None = None,
    checkpoint: str = "last",
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the requested evaluations of a trained run and write ``RUN_DIR/eval/``.

    Args:
        run_dir: A run directory written by ``fedvlm fit``.
        overrides: ``key=value`` overrides of ``evaluation.*`` (prompts, retrieval K, seeds).
        zero_shot: Write ``zero_shot.json`` (multi-label AUROC/F1/accuracy on the test split).
        retrieval: Write ``retrieval.json`` (Recall@K both ways; fused models).
        few_shot_k: Shots per class of the linear probes (``few_shot.json``); None: no probes;
            empty: ``evaluation.few_shot``.
        loho: Write ``loho.json`` (one federation per held-out hospital).
        hospitals: Held-out hospitals for ``loho`` (default all).
        loho_rounds: Rounds of each leave-one-out federation (default: the run's).
        checkpoint: ``last`` (default) or ``best``.
        console: Where progress goes.

    Returns:
        Everything written, keyed by file stem.

    Raises:
        ConfigError: For a run that is not a chest X-ray run, a missing checkpoint, or an
            override outside ``evaluation.*``.
    """
    console = console or Console()
    cfg = load_run_config(run_dir, overrides, "evaluation", "fedvlm evaluate")
    if cfg.task != "cxr":
        raise ConfigError(f"fedvlm evaluate supports task=cxr runs; {run_dir} is task={cfg.task}")
    module = load_trained_module(run_dir, cfg, checkpoint)
    _set_prompts(module, cfg, run_dir)
    out_dir = RunLayout(run_dir).evaluation
    out_dir.mkdir(exist_ok=True)
    written: dict[str, Any] = {}
    if retrieval and cfg.model.modality != "fused":
        raise ConfigError("--retrieval needs a vision-language (model.modality=fused) run")
    if zero_shot or retrieval:
        test = per_site_test_metrics(module, cfg, run_dir)
        scalars = test["pooled"]
        names = read_meta(run_dir)["label_names"]
        if zero_shot:
            written["zero_shot"] = {
                "method": "prompts" if cfg.model.modality == "fused" else f"{cfg.model.modality} label head",
                "macro_auroc": scalars["macro_auroc"],
                "macro_f1": scalars["macro_f1"],
                "accuracy": scalars["accuracy"],
                "per_class_auroc": {name: scalars[f"auroc/{name}"] for name in names},
                "num_test": test["num_test"],
                "pooling": f"merged counts of the sites' test splits (AUROC over {AUROC_BINS} thresholds)",
                "per_site": {
                    site: {k: v for k, v in values.items() if "_recall@" not in k}
                    for site, values in test["per_site"].items()
                },
                "checkpoint": checkpoint,
            }
        if retrieval:
            written["retrieval"] = {k: v for k, v in scalars.items() if "_recall@" in k} | {
                "num_test": test["num_test"],
                "gallery": "each site's own test split (merged hit counts)",
                "per_site": {
                    site: {k: v for k, v in values.items() if "_recall@" in k}
                    for site, values in test["per_site"].items()
                },
            }
    if few_shot_k is not None:
        few_shot_k = list(few_shot_k) or list(cfg.evaluation.few_shot)
        if cfg.model.modality == "text":
            raise ConfigError("--few-shot probes image features; this run is text-only")
        written["few_shot"] = few_shot_per_site(module, cfg, run_dir, few_shot_k, int(cfg.evaluation.few_shot_seeds))
    if loho:
        written["loho"] = leave_one_hospital_out(
            run_dir, cfg, hospitals, loho_rounds, console, checkpoint=checkpoint, overrides=overrides
        )
    for name, values in written.items():
        (out_dir / f"{name}.json").write_text(json.dumps(jsonable(values), indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(run_dir, out_dir))
    console.print((out_dir / "summary.md").read_text(), markup=False)
    return written


def summary_markdown(run_dir: Path, out_dir: Path) -> str:
    """A markdown summary of every ``eval/*.json`` present."""
    lines = [f"# Evaluation of `{run_dir}`", ""]
    zero_shot = _read(out_dir / "zero_shot.json")
    if zero_shot:
        lines += [
            f"## Classification on the sites' test splits ({zero_shot['method']}, {zero_shot['num_test']} images, "
            "merged counts)",
            "",
            "| label | AUROC |",
            "| --- | --- |",
        ]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in zero_shot["per_class_auroc"].items()]
        lines += [
            f"| **macro** | **{_fmt(zero_shot['macro_auroc'])}** |",
            "",
            f"macro F1 {_fmt(zero_shot['macro_f1'])}, accuracy {_fmt(zero_shot['accuracy'])}",
            "",
        ]
    retrieval = _read(out_dir / "retrieval.json")
    if retrieval:
        ks = sorted({int(key.split("@")[1]) for key in retrieval if "@" in key})
        lines += [
            "## Retrieval (Recall@K, within each site's test split)",
            "",
            "| direction | " + " | ".join(f"R@{k}" for k in ks) + " |",
            "| --- |" + " --- |" * len(ks),
        ]
        for direction, label in (("i2t", "image → text"), ("t2i", "text → image")):
            lines.append(
                f"| {label} | " + " | ".join(_fmt(retrieval.get(f"{direction}_recall@{k}")) for k in ks) + " |"
            )
        lines.append("")
    few = _read(out_dir / "few_shot.json")
    if few:
        lines += [
            "## Few-shot linear probe (macro AUROC, each site's own probe; mean and std over sites)",
            "",
            "| shots per class | mean | std | seeds | sites |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {k} | {_fmt(v['macro_auroc_mean'])} | {_fmt(v['macro_auroc_std'])} | {v['seeds']} | "
            f"{v.get('sites', '')} |"
            for k, v in few.items()
        ]
        lines.append("")
    loho = _read(out_dir / "loho.json")
    if loho:
        lines += [
            "## Leave-one-hospital-out (macro AUROC on the held-out hospital's data)",
            "",
            "| hospital | sites | n | held out of training | trained on it |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {h} ({v.get('site', '')}) | {', '.join(v['sites'])} | {v['num_samples']} | "
            f"{_fmt(v['held_out']['macro_auroc'])} | "
            f"{_fmt(v['trained_on']['macro_auroc'])} |"
            for h, v in loho.items()
        ]
        lines.append("")
    return "\n".join(lines)


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.3f}"
