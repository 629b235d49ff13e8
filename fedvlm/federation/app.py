"""The Flower app for the deployment engine: ``flwr run`` against a SuperLink and SuperNodes.

``pyproject.toml`` names the two components (``[tool.flwr.app.components]``)::

    serverapp = "fedvlm.federation.app:server_app"
    clientapp = "fedvlm.federation.app:client_app"

* :data:`server_app` runs :class:`~fedvlm.federation.server.FederatedServer` on the coordinator's
  prepared run directory, named in the run config: ``flwr run . fedvlm --run-config
  "run-dir='/srv/fedvlm/pilot'"`` (add ``resume=true`` to continue from ``checkpoints/last.ckpt``).
* :data:`client_app` serves one hospital's shard: its SuperNode names a site directory (made by
  :func:`export_site`) and its partition in the node config: ``flower-supernode ... --node-config
  "run-dir='/data/fedvlm/site' partition-id=3"``.

The deployment engine starts the ClientApp in a fresh process for every message. The ClientApp
keeps nothing in memory across rounds but caches (the run config, the shard, the frozen-weight
digest): everything a round needs comes from the site directory (which also holds what it writes,
e.g. explanations compared round to round) and the server's message, so it needs no
``context.state``.

:func:`prepare_run` prepares the coordinator's run directory (as ``fedvlm fit`` does, without
training); :func:`export_site` copies out what one hospital needs and nothing of the others.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedvlm.config import CONFIG_FILE_NAME, load_config, save_config
from fedvlm.data.prepared import load_bundle
from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation.client import RUN_DIR_KEY, make_client_app
from fedvlm.federation.server import FederatedServer
from fedvlm.runs import METRICS_FILE
from fedvlm.tasks import get_task
from fedvlm.tasks.base import DATA_DIR, META_FILE, TOKENIZER_DIR, read_meta

RESUME_KEY = "resume"
"""Run-config key: continue the run directory from its last completed round."""
NODE_POLL_SECONDS = 1.0
"""How often :func:`wait_for_nodes` asks the SuperLink for connected nodes."""
SITE_FILE = "site.json"
"""Written by :func:`export_site`: which partition a site directory holds and where it came from."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Wait until ``expected`` SuperNodes are connected (they may start after the run).

    Raises:
        FederationError: If fewer are connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() >= deadline:
            raise FederationError(
                f"{len(node_ids)} SuperNodes connected after {timeout:g}s, {expected} expected "
                "(federation.num_clients); check that every site's flower-supernode is running"
            )
        time.sleep(NODE_POLL_SECONDS)


def run_dir_from_config(run_config: Mapping[str, Any]) -> Path:
    """The coordinator's run directory named by the run config's ``run-dir``.

    Raises:
        ConfigError: If ``run-dir`` is unset or is not a prepared run directory on this host.
    """
    named = str(run_config.get(RUN_DIR_KEY, "")).strip()
    run_dir = Path(named).expanduser()
    if not named or not (run_dir / CONFIG_FILE_NAME).is_file():
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
    cfg = load_config(run_dir / CONFIG_FILE_NAME)
    expected = 1 if cfg.federation.mode == "centralized" else int(cfg.federation.num_clients)
    wait_for_nodes(grid, expected, float(cfg.federation.round_timeout))
    log(INFO, "fedvlm: %s, %d rounds, run directory %s", cfg.recipe, cfg.federation.rounds, run_dir)
    server = FederatedServer(cfg, run_dir, get_task(cfg.task), resume=resume, report=_log_round)
    progress = server.run(grid)
    log(INFO, "fedvlm: %d rounds completed; metrics in %s", progress.completed_round, run_dir / METRICS_FILE)


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

    The result is what ``fedvlm fit`` would train: ``config.yaml``, ``data/`` (``test.pt``, every
    client's shard, ``meta.json``), ``tokenizer/`` and ``partition.json``.

    Returns:
        The prepared-data facts (``meta.json``).

    Raises:
        ConfigError: If ``out`` exists and is not empty, or the config is invalid.
    """
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    cfg = load_config(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / CONFIG_FILE_NAME)
    try:
        return get_task(cfg.task).prepare(cfg, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written stays behind
        raise


def export_site(run_dir: Path, partition_id: int, out: Path) -> Path:
    """Copy what hospital ``partition_id``'s SuperNode needs out of a prepared run directory.

    The site directory holds ``config.yaml``, ``tokenizer/`` (if the run has one), ``data/meta.json``
    without the other clients' sizes, the run's shared non-patient files in ``data/`` (e.g. the CXR
    prompt bundle), files keyed by sample index cut to this client's samples (``Task.per_sample_files``),
    this client's ``data/client_<pid>_{train,val}.pt`` and ``site.json``. Left out:
    every other client's shard, the server's ``test.pt``, ``partition.json``, checkpoints, metrics.

    Note that a word tokenizer (``model.text_encoder.pretrained`` unset) was built from every
    site's training reports: its vocabulary is shared with all sites.

    Raises:
        ConfigError: If ``run_dir`` is not prepared, ``partition_id`` is not one of its clients,
            or ``out`` exists and is not empty.
    """
    meta = read_meta(run_dir)
    num_clients = int(meta["num_clients"])
    if not 0 <= partition_id < num_clients:
        raise ConfigError(f"partition id {partition_id} is not a client of {run_dir} (0..{num_clients - 1})")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    own = {f"client_{partition_id:03d}_train.pt", f"client_{partition_id:03d}_val.pt"}
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / CONFIG_FILE_NAME, out / CONFIG_FILE_NAME)
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    for path in sorted((run_dir / DATA_DIR).iterdir()):
        pooled = path.name == "test.pt" or (path.name.startswith("client_") and path.name not in own)
        if path.is_file() and path.name != META_FILE and not pooled:
            shutil.copy2(path, out / DATA_DIR / path.name)
    missing = sorted(own - {p.name for p in (out / DATA_DIR).iterdir()})
    if missing:
        raise ConfigError(f"{run_dir / DATA_DIR} lacks {', '.join(missing)}")
    samples = {str(i) for name in own for i in load_bundle(out / DATA_DIR / name)["index"].tolist()}
    for name in get_task(load_config(run_dir / CONFIG_FILE_NAME).task).per_sample_files:
        if (out / DATA_DIR / name).is_file():
            entries = json.loads((out / DATA_DIR / name).read_text())
            (out / DATA_DIR / name).write_text(json.dumps({k: v for k, v in entries.items() if k in samples}))
    site_meta = {k: v for k, v in meta.items() if k != "client_sizes"}
    (out / DATA_DIR / META_FILE).write_text(json.dumps(site_meta, indent=2))
    (out / SITE_FILE).write_text(json.dumps({"partition_id": partition_id, "exported_from": str(run_dir)}, indent=2))
    return out


__all__ = ["client_app", "export_site", "prepare_run", "run_dir_from_config", "server_app", "wait_for_nodes"]
