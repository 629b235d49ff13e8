"""``fedvlm fit``: prepare a run directory, run the federation, summarise the result."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fedvlm.config import load_config, save_config
from fedvlm.data.sites import site_names
from fedvlm.errors import ConfigError
from fedvlm.runs import RunLayout, new_run_dir, plot_curves, read_metrics
from fedvlm.tasks import get_task
from fedvlm.tasks.base import curve_keys, selection_key


def fit(
    recipe: str | None,
    overrides: list[str],
    out: Path | None = None,
    resume: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Train a federation (or the centralized baseline) and return its run directory.

    Args:
        recipe: Recipe name or YAML path (ignored with ``resume``).
        overrides: ``key=value`` config overrides.
        out: Run directory to create (default ``runs/<recipe>-<timestamp>``).
        resume: A run directory to continue from its last completed round; ``overrides`` may
            change e.g. ``federation.rounds`` (the config saved in the run is updated).
    """
    from fedvlm.federation.simulation import simulate

    console = console or Console()
    if resume is not None:
        run_dir = resume
        config_file = RunLayout(run_dir).config
        if not config_file.is_file():
            raise ConfigError(f"cannot resume {run_dir}: it has no {config_file.name}")
        cfg = load_config(config_file, overrides)
        _check_resume_overrides(load_config(config_file), cfg)
        save_config(cfg, config_file)
        console.print(f"[bold]Resuming[/] {run_dir}")
    else:
        cfg = load_config(recipe, overrides)
        run_dir = _create_run_dir(out, cfg.recipe)
        save_config(cfg, RunLayout(run_dir).config)
        console.print(f"[bold]fedvlm fit[/] recipe={cfg.recipe} → {run_dir}")
        try:  # the coordinator's part: tokenizer, prompts, meta; each client prepares its own data
            get_task(cfg.task).prepare(cfg, run_dir)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written stays behind
            raise
        sites = site_names(cfg) if cfg.federation.mode != "centralized" else ["pooled"]
        console.print(f"sites: {', '.join(sites)} (each prepares its own data in clients/client_NNN/data)")

    reporter = RoundDisplay(console, cfg, curve_keys(get_task(cfg.task), cfg))
    try:
        with reporter:
            simulate(cfg, run_dir, resume=resume is not None, report=reporter.update)
    except BaseException:
        if resume is None and not read_metrics(run_dir):  # e.g. a site's data failed validation
            shutil.rmtree(run_dir, ignore_errors=True)  # no round completed: nothing half-written stays
        raise
    rows = read_metrics(run_dir)
    if rows:
        task = get_task(cfg.task)
        plot_curves(run_dir, rows, curve_keys(task, cfg))
        console.print(summary_table(rows, cfg, selection_key(task, cfg)))
    partition_file = RunLayout(run_dir).partition
    if partition_file.is_file():
        clients = json.loads(partition_file.read_text())["clients"]
        console.print(
            "data (as the sites report): "
            + ", ".join(f"{c['site']} {c['train']}/{c['val']}/{c['test']}" for c in clients)
            + " (train/val/test)"
        )
        for client in clients:  # documented, counted skips: never a silent drop
            for reason, count in (client.get("skipped") or {}).items():
                console.print(f"[yellow]{client['site']}: skipped {count}[/] {reason}")
    console.print(f"run directory: {run_dir} (metrics.jsonl, checkpoints/, curves.png)")
    return run_dir


FROZEN_ON_RESUME = ("task", "seed", "data", "model", "contrastive", "federation.mode", "federation.num_clients")
"""Config keys that shaped the prepared data or the model: a resumed run cannot change them."""


def _check_resume_overrides(saved: DictConfig, resumed: DictConfig) -> None:
    for key in FROZEN_ON_RESUME:
        before, after = OmegaConf.select(saved, key), OmegaConf.select(resumed, key)
        if before != after:
            raise ConfigError(
                f"{key} cannot change on --resume (the run was prepared with {key}={before}); start a new run"
            )


def _create_run_dir(out: Path | None, recipe: str) -> Path:
    if out is None:
        return new_run_dir(recipe)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty (use --resume to continue a run)")
    out.mkdir(parents=True, exist_ok=True)
    return out


class RoundDisplay:
    """A rich progress bar over rounds with one summary line per completed round."""

    def __init__(self, console: Console, cfg: DictConfig, metric_keys: tuple[str, ...]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.metric_keys = metric_keys
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task_id = self.progress.add_task("rounds", total=int(cfg.federation.rounds))

    def __enter__(self) -> RoundDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        failed = row.get("failed_clients") or {}
        values = "  ".join(f"{key.split('/')[-1]} {row.get(key, float('nan')):.3f}" for key in self.metric_keys)
        line = (
            f"round {row['round']:>3}  {values}  loss {row.get('train/loss', float('nan')):.3f}  "
            f"{row['round_seconds']:.1f}s  ↑{row['bytes_received'] / 1e6:.1f}MB ↓{row['bytes_sent'] / 1e6:.1f}MB"
        )
        if failed:
            line += f"  [red]failed: {', '.join(f'{pid} ({why})' for pid, why in failed.items())}[/]"
        if row.get("converged"):
            line += "  [green]converged (‖Δθ‖ < ε)[/]"
        self.progress.console.print(line)
        self.progress.update(self.task_id, completed=row["round"])


def summary_table(rows: list[dict[str, Any]], cfg: DictConfig, selection_metric: str) -> Table:
    """Final and best-round (by ``selection_metric``, a ``metrics.jsonl`` key) values of the
    headline metrics (per-site values stay in ``metrics.jsonl``)."""
    evaluated = [r for r in rows if not math.isnan(_number(r.get(selection_metric)))]
    best = max(evaluated, key=lambda r: _number(r.get(selection_metric))) if evaluated else rows[-1]
    last = rows[-1]
    table = Table(title=f"{cfg.recipe}: {len(rows)} rounds ({cfg.federation.mode}, {cfg.federation.strategy})")
    table.add_column("metric")
    table.add_column(f"last (round {last['round']})", justify="right")
    table.add_column(f"best (round {best['round']})", justify="right")
    keys = [
        key
        for key in last
        if (key.startswith(("test/", "val/")) and not key.startswith("test/site/"))
        or key in ("train/loss", "update_norm")
    ]
    for key in keys:
        table.add_row(key, f"{_number(last[key]):.4f}", f"{_number(best.get(key)):.4f}")
    total_bytes = sum(r["bytes_sent"] + r["bytes_received"] for r in rows)
    table.add_row("traffic (MB, all rounds)", f"{total_bytes / 1e6:.1f}", "")
    table.add_row("time (s, all rounds)", f"{sum(r['round_seconds'] for r in rows):.1f}", "")
    return table


def _number(value: Any) -> float:
    """A metric read back from JSON: non-finite values were written as null."""
    return float("nan") if value is None else float(value)
