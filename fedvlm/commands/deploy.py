"""``fedvlm deploy``: the coordinator's side of a deployment, before ``flwr run``.

:func:`prepare_run` prepares the coordinator's run directory (config, tokenizer, prompts: no
data); :func:`export_site` copies out what a hospital's SuperNode needs, which is the same for
every hospital. The Flower apps that then run on the SuperLink and SuperNodes are
:mod:`fedvlm.federation.app`'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from fedvlm.config import load_config, save_config
from fedvlm.errors import ConfigError
from fedvlm.runs import RunLayout
from fedvlm.tasks import get_task
from fedvlm.tasks.base import read_meta


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


def certificates(
    out: Path,
    hosts: list[str] | None,
    supernodes: int,
    days: int,
    supernode_key: str | None,
    console: Console,
) -> None:
    """``fedvlm certs``: the TLS certificates of a SuperLink and its SuperNodes' authentication
    keys, or (``supernode_key``) one SuperNode's key pair, made on the site itself."""
    from fedvlm.federation.certs import DEFAULT_HOSTS, make_certificates, make_supernode_key

    if supernode_key:
        key = make_supernode_key(out, supernode_key)
        console.print(
            f"wrote {key.private_key} (keep it here) and {key.public_key} (send it to the coordinator)", soft_wrap=True
        )
        return
    written = make_certificates(out, hosts or DEFAULT_HOSTS, supernodes, days)
    console.print(
        f"wrote {written.ca_cert} (give to every site), {written.server_cert} + {written.server_key} (SuperLink), "
        f"{written.ca_key} (keep offline)",
        soft_wrap=True,
    )
    for key in written.supernode_keys:
        console.print(f"wrote {key.private_key} + {key.public_key} (SuperNode authentication)", soft_wrap=True)


__all__ = ["certificates", "export_site", "prepare_run"]
