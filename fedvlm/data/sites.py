"""Sites: which data one client reads, named by configuration that only that client uses.

A federation either lists its hospitals (``data.sites``: one client per entry, each with its own
folder and layout) or, as a simulation convenience, splits one source with ``data.partition``.
Either way a client's process reads only its own site (:func:`client_source`); the coordinator
knows site names and the counts the sites report, never a sample.

A site entry takes the keys of ``data`` that describe a source and inherits the rest::

    - {name: hospital_a, format: all_idb2, root: /data/a/ALL_IDB2, reports: /data/a/reports.csv}
    - {name: hospital_c, format: manifest, root: /data/c/manifest.csv}

``data.sites`` is that list inline, or the path of a YAML file holding it (read when the config is
loaded, so the run's saved ``config.yaml`` repeats the run on its own). Under Flower's deployment
engine a SuperNode names its site in its node config instead (:data:`NODE_CONFIG_KEYS`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvlm.errors import ConfigError

SITE_KEYS = (
    "format",
    "root",
    "reports",
    "test_fraction",
    "val_fraction",
    "uncertain",
    "equalize",
    "image_cache",
    "synthetic",
    "synthetic_cxr",
)
"""Keys of ``data`` a site entry may set: where its data are, their layout, and its local splits.
Everything else (image size, text length, labels, augmentation) is the recipe's, the same at every site."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NODE_CONFIG_KEYS = {
    "site-name": "name",
    "data-format": "format",
    "data-root": "root",
    "data-reports": "reports",
}
"""SuperNode ``--node-config`` keys that name the node's own data, and the site keys they set."""


@dataclass(frozen=True)
class ClientSource:
    """What one client reads.

    Attributes:
        site: The site's name (``client_NNN`` for a partition of one source).
        cfg: The run config with ``data`` replaced by this site's (its own source keys over the recipe's).
        partition: With one source split by ``data.partition``: this client's partition id, else None.
    """

    site: str
    cfg: DictConfig
    partition: int | None = None


def read_site_entries(value: Any) -> list[dict[str, Any]] | None:
    """The validated site entries of ``data.sites`` (a list, or the path of a YAML list), or None.

    Raises:
        ConfigError: If the file is missing or not a list, an entry is not a mapping, has no or a
            duplicate ``name``, or sets a key that is not a site key (naming the entry and the key).

    Example:
        >>> read_site_entries([{"name": "a", "format": "all_idb2", "root": "/data/a"}])
        [{'name': 'a', 'format': 'all_idb2', 'root': '/data/a'}]
        >>> read_site_entries([{"name": "a", "image_size": 32}])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fedvlm.errors.ConfigError: data.sites[0] (a): image_size is not a site key; a site sets only name, ...
    """
    if value is None:
        return None
    where = "data.sites"
    if isinstance(value, str | Path):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.sites={str(value)!r}: no such file (a YAML list of site entries)")
        try:
            value = OmegaConf.load(path)
        except OmegaConfBaseException as err:
            raise ConfigError(f"data.sites file {path}: {err}") from None
        where = str(path)
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of site entries, got {type(value).__name__}")
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for position, entry in enumerate(value):
        label = f"{where}[{position}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{label} must be a mapping with a name and the site's data keys, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(f"{label}: name={name!r} must be a word of letters, digits, '_', '.' or '-'")
        if name in seen:
            raise ConfigError(f"{label}: two sites are named {name!r}")
        seen.add(name)
        unknown = [key for key in entry if key != "name" and key not in SITE_KEYS]
        if unknown:
            raise ConfigError(
                f"{label} ({name}): {unknown[0]} is not a site key; a site sets only name, {', '.join(SITE_KEYS)}"
            )
        entries.append(dict(entry))
    return entries


SERVER_TEST = "server_test"
"""The site name of ``data.server_test``, the coordinator's own (public) test set."""


def server_test_entry(cfg: DictConfig) -> dict[str, Any] | None:
    """``data.server_test`` as a site entry named :data:`SERVER_TEST`, or None.

    Raises:
        ConfigError: If it is not a mapping of site keys (naming the key).

    Example:
        >>> from omegaconf import OmegaConf
        >>> server_test_entry(OmegaConf.create({"data": {"server_test": {"format": "openi", "root": "/pub"}}}))
        {'name': 'server_test', 'format': 'openi', 'root': '/pub'}
    """
    value = cfg.data.server_test
    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.server_test must be a mapping of site keys (format, root ...), got {value!r}")
    unknown = [key for key in value if key not in SITE_KEYS]
    if unknown:
        raise ConfigError(f"data.server_test: {unknown[0]} is not a site key; it sets only {', '.join(SITE_KEYS)}")
    if "root" not in value:
        raise ConfigError("data.server_test needs a root: the coordinator's own (public) test data")
    return {"name": SERVER_TEST, **value}


def site_config(cfg: DictConfig, entry: Mapping[str, Any]) -> DictConfig:
    """``cfg`` with ``data`` = the recipe's data, the site's own keys merged over it, and no site list.

    Raises:
        ConfigError: If a value has the wrong type for its key (naming the site and the key).
    """
    site_cfg = cfg.copy()
    own = {key: value for key, value in entry.items() if key != "name"}
    try:
        overrides: dict[str, Any] = {"sites": None, **own}
        site_cfg.data = OmegaConf.merge(cfg.data, overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"site {entry.get('name')!r}: {err}") from None
    return site_cfg


def site_names(cfg: DictConfig) -> list[str]:
    """The clients' site names in partition order: the listed sites, else ``client_000`` …"""
    entries = read_site_entries(cfg.data.sites)
    if entries is not None:
        return [entry["name"] for entry in entries]
    return [partition_site_name(pid) for pid in range(int(cfg.federation.num_clients))]


def partition_site_name(partition_id: int) -> str:
    """The site name of partition ``partition_id`` of one source."""
    return f"client_{partition_id:03d}"


def client_source(cfg: DictConfig, partition_id: int, node_config: Mapping[str, Any] | None = None) -> ClientSource:
    """What client ``partition_id`` reads: the site its node config names (deployment), else its
    entry of ``data.sites``, else its partition of the one source ``data`` names.

    Raises:
        ConfigError: If ``partition_id`` has no site entry, or the node config names a site only in part.
    """
    node_config = node_config or {}
    named = {site_key: node_config[key] for key, site_key in NODE_CONFIG_KEYS.items() if key in node_config}
    if named:
        if "name" not in named or "root" not in named:
            raise ConfigError(
                "this SuperNode's node config names its data only in part: give site-name, data-format, data-root "
                f"(and data-reports where the layout has one); got {', '.join(sorted(named))}"
            )
        named_entry = read_site_entries([{"format": "auto", **{k: str(v) for k, v in named.items()}}])
        assert named_entry is not None
        return ClientSource(named_entry[0]["name"], site_config(cfg, named_entry[0]))
    entries = read_site_entries(cfg.data.sites)
    if entries is None:
        return ClientSource(partition_site_name(partition_id), cfg, partition_id)
    if not 0 <= partition_id < len(entries):
        raise ConfigError(f"client {partition_id} has no entry in data.sites ({len(entries)} sites)")
    entry = entries[partition_id]
    return ClientSource(entry["name"], site_config(cfg, entry))
