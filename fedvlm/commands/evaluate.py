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

from omegaconf import DictConfig
from rich.console import Console

from fedvlm.config import load_config, load_run_config, save_config
from fedvlm.data.prepared import bundle_size
from fedvlm.errors import ConfigError
from fedvlm.evaluation.metrics import AUROC_BINS
from fedvlm.runs import RunLayout, jsonable
from fedvlm.tasks.base import load_trained_module, read_meta
from fedvlm.tasks.cxr.evaluation import (
    classification_and_retrieval,
    few_shot_per_site,
    per_site_test_metrics,
    set_evaluation_prompts,
)
from fedvlm.tasks.site_store import client_bundle, client_site, site_data_folders


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
    set_evaluation_prompts(full_model, cfg, run_dir)
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
        set_evaluation_prompts(model, loho_cfg, loho_dir)
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
    set_evaluation_prompts(module, cfg, run_dir)
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
