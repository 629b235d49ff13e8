"""Run a prepared run directory as a Flower simulation (Ray backend) on this machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from omegaconf import DictConfig

from fedvlm.federation.client import make_client_app
from fedvlm.federation.server import FederatedServer, Progress, RoundReporter
from fedvlm.tasks import get_task


def make_server_app(
    cfg: DictConfig, run_dir: Path, resume: bool, report: RoundReporter | None, outcome: dict[str, Any]
) -> ServerApp:
    """A ServerApp running :class:`FederatedServer`; its result or error lands in ``outcome``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server = FederatedServer(cfg, run_dir, get_task(cfg.task), resume=resume, report=report)
            outcome["progress"] = server.run(grid)
        except BaseException as err:
            outcome["error"] = err

    return app


def simulate(cfg: DictConfig, run_dir: Path, resume: bool = False, report: RoundReporter | None = None) -> Progress:
    """Run the federation of ``run_dir`` in a local Flower simulation.

    One SuperNode per client; each ClientApp gets ``federation.num_cpus_per_client`` CPUs (and
    GPUs), so on a 2-core machine two clients train at a time. In centralized mode the single
    client gets every CPU.

    Raises:
        Exception: Whatever stopped the ServerApp (e.g. ``FederationError``), re-raised here.
    """
    outcome: dict[str, Any] = {}
    federation = cfg.federation
    centralized = federation.mode == "centralized"
    num_supernodes = 1 if centralized else int(federation.num_clients)
    # The pooled baseline is one client: give it the whole machine, as federated clients share it.
    num_cpus = float(os.cpu_count() or 1) if centralized else float(federation.num_cpus_per_client)
    # run_simulation's deprecation notice points to `flwr run`; `fedvlm fit` is our front door.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=make_server_app(cfg, run_dir, resume, report, outcome),
        client_app=make_client_app(run_dir),
        num_supernodes=num_supernodes,
        backend_config={
            "client_resources": {
                "num_cpus": num_cpus,
                "num_gpus": float(federation.num_gpus_per_client),
            },
            "init_args": {"include_dashboard": False, "log_to_driver": False, "logging_level": "error"},
        },
    )
    if "error" in outcome:
        raise outcome["error"]
    if "progress" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the ServerApp")
    return outcome["progress"]
