"""The Flower app for the deployment engine: ``flwr run`` against a SuperLink and SuperNodes.

``pyproject.toml`` names the two components (``[tool.flwr.app.components]``)::

    serverapp = "fedvlm.federation.app:server_app"
    clientapp = "fedvlm.federation.app:client_app"

* :data:`server_app` runs :class:`~fedvlm.federation.server.FederatedServer` on the coordinator's
  prepared run directory, named in the run config: ``flwr run . fedvlm --run-config
  "run-dir='/srv/fedvlm/pilot'"`` (add ``resume=true`` to continue from ``checkpoints/last.ckpt``).
* :data:`client_app` serves one hospital: its SuperNode names a site directory (made by
  :func:`export_site`: the run's config and tokenizer, no data), its partition and its own data
  in the node config: ``flower-supernode ... --node-config "run-dir='/data/fedvlm/site'
  partition-id=0 site-name='hospital_a' data-format='all_idb2' data-root='/data/ALL_IDB2'
  data-reports='/data/reports.csv'"``. The ClientApp reads and prepares that data itself, into
  the site directory's ``clients/client_NNN/data/``; the coordinator never sees a path or a sample.

The deployment engine starts the ClientApp in a fresh process for every message. The ClientApp
keeps nothing in memory across rounds but caches (the run config, the prepared splits, the
frozen-weight digest): everything a round needs comes from the site directory (which also holds
what it writes, e.g. explanations compared round to round) and the server's message, so it needs
no ``context.state``.

:func:`prepare_run` prepares the coordinator's run directory (config, tokenizer, prompts: no
data); :func:`export_site` copies out what a hospital's SuperNode needs, which is the same for
every hospital.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedvlm.config import load_config, save_config
from fedvlm.errors import ConfigError
from fedvlm.federation.client import RUN_DIR_KEY, make_client_app
from fedvlm.federation.server import FederatedServer, wait_for_nodes
from fedvlm.runs import RunLayout
from fedvlm.tasks import get_task
from fedvlm.tasks.base import read_meta

RESUME_KEY = "resume"
"""Run-config key: continue the run directory from its last completed round."""


def run_dir_from_config(run_config: Mapping[str, Any]) -> Path:
    """The coordinator's run directory named by the run config's ``run-dir``.

    Raises:
        ConfigError: If ``run-dir`` is unset or is not a prepared run directory on this host.
    """
    named = str(run_config.get(RUN_DIR_KEY, "")).strip()
    run_dir = Path(named).expanduser()
    if not named or not RunLayout(run_dir).config.is_file():
        raise ConfigError(
            f"run config {RUN_DIR_KEY}={named!r} is not a prepared run directory on the SuperLink host: "
            f"give --run-config \"{RUN_DIR_KEY}='/abs/path/to/run'\" (see fedvlm.federation.app.prepare_run)"
        )
    return run_dir


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    """Run the rounds of the run directory named in the run config (``run-dir``)."""
    run_dir = run_dir_from_config(context.run_config)
    resume = bool(context.run_config.get(RESUME_KEY, False))
    cfg = load_config(RunLayout(run_dir).config)
    expected = 1 if cfg.federation.mode == "centralized" else int(cfg.federation.num_clients)
    wait_for_nodes(grid, expected, float(cfg.federation.round_timeout))
    log(INFO, "fedvlm: %s, %d rounds, run directory %s", cfg.recipe, cfg.federation.rounds, run_dir)
    server = FederatedServer(cfg, run_dir, get_task(cfg.task), resume=resume, report=_log_round)
    progress = server.run(grid)
    log(INFO, "fedvlm: %d rounds completed; metrics in %s", progress.completed_round, RunLayout(run_dir).metrics)


def _log_round(row: dict[str, Any]) -> None:
    """One line per round in the ServerApp's log (``flwr log RUN_ID``)."""
    values = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("test/") and isinstance(v, float))
    failed = row.get("failed_clients") or {}
    log(
        INFO,
        "fedvlm: round %d  %s  clients %d%s",
        row["round"],
        values,
        row["num_clients"],
        f"  failed {failed}" if failed else "",
    )


client_app = make_client_app()


def prepare_run(recipe: str | None, overrides: list[str], out: Path) -> dict[str, Any]:
    """Prepare a run directory on the coordinator without training (``Task.prepare``).

    It holds what the coordinator may: ``config.yaml``, ``tokenizer/`` (never built from a site's
    reports) and ``data/`` (``meta.json``, CXR prompts). No site's data is read: each SuperNode
    prepares its own, and ``partition.json`` is written from the counts they report.

    Returns:
        The prepared-data facts (``meta.json``).

    Raises:
        ConfigError: If ``out`` exists and is not empty, or the config is invalid.
    """
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    cfg = load_config(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunLayout(out).config)
    try:
        return get_task(cfg.task).prepare(cfg, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written stays behind
        raise


def export_site(run_dir: Path, partition_id: int, out: Path) -> Path:
    """Copy what hospital ``partition_id``'s SuperNode needs out of a prepared run directory.

    The site directory holds ``config.yaml``, ``tokenizer/`` (if the run has one), ``data/``
    (``meta.json``, the CXR prompt bundle) and ``site.json``: nothing about any site's data, so
    every hospital gets the same files; its node config names its own data.

    Raises:
        ConfigError: If ``run_dir`` is not prepared, ``partition_id`` is not one of its clients,
            or ``out`` exists and is not empty.
    """
    read_meta(run_dir)  # fails when run_dir was never prepared
    run, site = RunLayout(run_dir), RunLayout(out)
    cfg = load_config(run.config)
    num_clients = int(cfg.federation.num_clients)
    if not 0 <= partition_id < num_clients:
        raise ConfigError(f"partition id {partition_id} is not a client of {run_dir} (0..{num_clients - 1})")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    site.data.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run.config, site.config)
    if run.tokenizer.is_dir():
        shutil.copytree(run.tokenizer, site.tokenizer)
    for source, copy in ((run.meta, site.meta), (run.prompts, site.prompts)):  # what a SuperNode needs
        if source.is_file():
            shutil.copy2(source, copy)
    site.site_file.write_text(json.dumps({"partition_id": partition_id, "exported_from": str(run_dir)}, indent=2))
    return out


__all__ = ["client_app", "export_site", "prepare_run", "run_dir_from_config", "server_app", "wait_for_nodes"]
