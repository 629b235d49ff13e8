"""The Flower app for the deployment engine: ``flwr run`` against a SuperLink and SuperNodes.

``pyproject.toml`` names the two components (``[tool.flwr.app.components]``)::

    serverapp = "fedvlm.federation.app:server_app"
    clientapp = "fedvlm.federation.app:client_app"

* :data:`server_app` runs :class:`~fedvlm.federation.server.FederatedServer` on the coordinator's
  prepared run directory, named in the run config: ``flwr run . fedvlm --run-config
  "run-dir='/srv/fedvlm/pilot'"`` (add ``resume=true`` to continue from ``checkpoints/last.ckpt``).
* :data:`client_app` serves one hospital: its SuperNode names a site directory (made by
  :func:`fedvlm.commands.deploy.export_site`: the run's config and tokenizer, no data), its partition and its own data
  in the node config: ``flower-supernode ... --node-config "run-dir='/data/fedvlm/site'
  partition-id=0 site-name='hospital_a' data-format='all_idb2' data-root='/data/ALL_IDB2'
  data-reports='/data/reports.csv'"``. The ClientApp reads and prepares that data itself, into
  the site directory's ``clients/client_NNN/data/``; the coordinator never sees a path or a sample.

The deployment engine starts the ClientApp in a fresh process for every message. The ClientApp
keeps nothing in memory across rounds but caches (the run config, the prepared splits, the
frozen-weight digest): everything a round needs comes from the site directory (which also holds
what it writes, e.g. explanations compared round to round) and the server's message, so it needs
no ``context.state``.

``fedvlm deploy prepare`` and ``fedvlm deploy export-site`` (:mod:`fedvlm.commands.deploy`) make
the coordinator's run directory and the hospitals' site directories beforehand.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation.client import RUN_DIR_KEY, make_client_app
from fedvlm.federation.server import FederatedServer, wait_for_nodes
from fedvlm.runs import RunLayout
from fedvlm.tasks import get_task

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
            f"give --run-config \"{RUN_DIR_KEY}='/abs/path/to/run'\" (see fedvlm.commands.deploy.prepare_run)"
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
    # Sites have real speeds here: asynchronous rounds take replies as they arrive.
    server = FederatedServer(cfg, run_dir, get_task(cfg.task), resume=resume, report=_log_round, arrival_order=True)
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


__all__ = ["client_app", "run_dir_from_config", "server_app", "wait_for_nodes"]
