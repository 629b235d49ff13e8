"""Typed configuration: the schema's defaults, recipe YAML merged over them, then CLI overrides.

``OmegaConf.structured`` turns the schema (:mod:`fedvlm.schema`) into a config that rejects
unknown keys and values of the wrong type, naming the key; :mod:`fedvlm.validation` checks the
rest. A recipe (``recipes/<name>.yaml``) is a small diff over
these defaults, and ``key=value`` overrides from the command line are merged last. The fully
resolved config is saved into every run directory so that a run can be repeated exactly.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedvlm.data.sites import read_site_entries, server_test_entry
from fedvlm.errors import ConfigError
from fedvlm.registry import load_plugins, registry_of
from fedvlm.runs import RunLayout
from fedvlm.schema import Config
from fedvlm.validation import validate

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


COMPONENTS: dict[str, str] = {
    "federation.strategy": "fedvlm.strategies",
    "federation.codec": "fedvlm.codecs",
    "data.partition": "fedvlm.partitioners",
    "federation.byzantine.attack": "fedvlm.attacks",
    "federation.staleness": "fedvlm.staleness",
    "federation.client_speed": "fedvlm.client_speeds",
}
"""Config keys naming a component with options (``{name: ..., option: value}``) → its plugin group."""

NAMED: dict[str, str] = {
    "model.image_encoder.name": "fedvlm.image_encoders",
    "model.text_encoder.name": "fedvlm.text_encoders",
    "model.fusion": "fedvlm.fusions",
    "task": "fedvlm.tasks",
}
"""Config keys naming a component by name alone → its plugin group."""

MOVED: dict[str, str] = {
    "federation.proximal_mu": "federation.strategy.mu (federation.strategy={name: fedprox, mu: 0.01})",
    "federation.server_learning_rate": "federation.strategy.server_learning_rate (with name: fedavgm)",
    "federation.server_momentum": "federation.strategy.server_momentum (with name: fedavgm)",
    "federation.trim_fraction": "federation.strategy.trim_fraction (with name: trimmed_mean)",
    "federation.byzantine_f": "federation.strategy.byzantine_f (with name: krum or multikrum)",
    "federation.multikrum_m": "federation.strategy.num_selected (with name: multikrum)",
    "federation.robust_proximal": "federation.strategy.mu (a robust strategy sends FedProx's μ when mu > 0)",
    "federation.update_codec": "federation.codec",
    "federation.byzantine.scale": "federation.byzantine.attack.scale (with name: sign_flip or scale)",
    "federation.byzantine.noise_std": "federation.byzantine.attack.noise_std (with name: gaussian)",
    "data.partition.site_fallback": "data.partition.fallback (with name: site)",
}
"""Flat keys of earlier versions → where their setting lives now (an old recipe fails naming it)."""


def list_recipes(recipes_dir: Path = RECIPES_DIR) -> dict[str, str]:
    """Recipe names mapped to the first line of their leading comment."""
    recipes: dict[str, str] = {}
    for path in sorted(recipes_dir.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        recipes[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return recipes


def recipe_path(recipe: str, recipes_dir: Path = RECIPES_DIR) -> Path:
    """Resolve a recipe name (``leukemia_demo``) or a YAML path.

    Raises:
        ConfigError: If no such recipe exists; lists the known recipes.
    """
    candidate = Path(recipe)
    if candidate.suffix in {".yaml", ".yml"} and candidate.is_file():
        return candidate
    path = recipes_dir / f"{recipe}.yaml"
    if not path.is_file():
        known = ", ".join(list_recipes(recipes_dir)) or "(none)"
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {known}")
    return path


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Build a run configuration: defaults ← recipe YAML ← ``key=value`` overrides.

    Args:
        recipe: A recipe name, a path to a recipe or saved ``config.yaml``, or None for defaults.
        overrides: Dotted ``key=value`` strings, e.g. ``["federation.rounds=5"]``.

    Returns:
        The merged, validated config (a structured ``DictConfig``: unknown keys still raise).

    Raises:
        ConfigError: Naming the unknown key, the wrongly typed value or the invalid choice.

    Example:
        >>> cfg = load_config(None, ["federation.rounds=3", "federation.strategy=fedprox"])
        >>> cfg.federation.rounds, dict(cfg.federation.strategy)
        (3, {'name': 'fedprox', 'mu': 0.01})
        >>> load_config(None, ["federation.roundz=3"])
        Traceback (most recent call last):
        ...
        fedvlm.errors.ConfigError: federation.roundz=3: Key 'roundz' not in 'FederationConfig'. Did you mean: 'rounds'?
    """
    load_plugins()  # third-party components register before any name is checked
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        path = recipe_path(str(recipe))
        try:
            recipe_cfg = OmegaConf.load(path)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_reason(err)}") from None
        for old, new in MOVED.items():
            if OmegaConf.select(recipe_cfg, old, default=None) is not None:
                raise ConfigError(f"{path}: {old} has moved to {new}")
        try:
            cfg = OmegaConf.merge(cfg, recipe_cfg)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_reason(err)}") from None
        if "recipe" not in recipe_cfg:
            cfg.recipe = path.stem
    settle_components(cfg)
    for override in overrides:
        cfg = _apply_override(cfg, override)
        settle_components(cfg)
    server_test_entry(cfg)  # a misspelled key fails here, not when the coordinator prepares it
    sites = read_site_entries(cfg.data.sites)
    if sites is not None:  # the list itself, so the saved config.yaml repeats the run on its own
        cfg.data.sites = sites
        cfg.federation.num_clients = len(sites)
    validate(cfg)
    return cfg


def load_run_config(run_dir: Path, overrides: Sequence[str], section: str, command: str) -> DictConfig:
    """The config a run was trained with (its ``config.yaml``), with ``overrides`` of ``section`` only.

    Args:
        run_dir: A run directory.
        overrides: ``key=value`` strings; each must lie in ``section`` (``evaluation``, ``explain``).
        section: The config section the command may change.
        command: The command, for error messages (``fedvlm evaluate``).

    Raises:
        ConfigError: If ``run_dir`` is not a run directory, or an override is outside ``section``.
    """
    path = RunLayout(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {path.name})")
    outside = [o for o in overrides if not o.startswith(f"{section}.")]
    if outside:
        raise ConfigError(f"{command} only takes {section}.* overrides, got: {', '.join(outside)}")
    return load_config(path, list(overrides))


def _apply_override(cfg: DictConfig, override: str) -> DictConfig:
    """Merge one ``key=value``; naming a component (``federation.strategy=fedprox`` or
    ``data.partition.name=iid``) starts it from that component's default options."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key = override.split("=", 1)[0].strip()
    for old, new in MOVED.items():
        if key == old or key.startswith(f"{old}."):
            raise ConfigError(f"{override}: {old} has moved to {new}")
    try:
        given = OmegaConf.from_dotlist([override])
        slot = next((c for c in COMPONENTS if key in (c, f"{c}.name")), None)
        if slot is None:
            return cast(DictConfig, OmegaConf.merge(cfg, given))
        value = OmegaConf.select(given, key)
        value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
        OmegaConf.update(cfg, slot, value if key == slot else {"name": value}, merge=False)
        return cfg
    except OmegaConfBaseException as err:
        raise ConfigError(f"{override}: {_reason(err)}") from None


def settle_components(cfg: DictConfig) -> None:
    """Check every component the config names, and write each with its options in full.

    A component with options (:data:`COMPONENTS`) becomes ``{name, **options}`` with every
    option present, checked against the dataclass it registered; an encoder that declared options
    has its ``options`` checked the same way; names alone (:data:`NAMED`) must be registered.
    User modules named by ``model.module_class`` / ``data.datamodule_class`` are imported first,
    since they may register components.

    Raises:
        ConfigError: Naming the key: an unknown name (listing the valid ones), an unknown option,
            a wrong type or a value out of range.
    """
    for key in ("model.module_class", "data.datamodule_class"):
        dotted = OmegaConf.select(cfg, key)
        if dotted:
            try:
                importlib.import_module(str(dotted).rpartition(".")[0])
            except ImportError as err:
                raise ConfigError(f"{key}={dotted!r} cannot be imported: {err}") from None
    for key, group in COMPONENTS.items():
        registry = registry_of(group)
        value = OmegaConf.select(cfg, key)
        spec = registry.spec(OmegaConf.to_container(value) if isinstance(value, DictConfig) else value, key)
        if spec.get("fallback") is not None:  # data.partition {name: site, fallback: ...}: a partitioner itself
            spec["fallback"] = registry.spec(spec["fallback"], f"{key}.fallback")
        OmegaConf.update(cfg, key, spec, merge=False)
    for key, group in NAMED.items():
        name = OmegaConf.select(cfg, key)
        try:
            registry_of(group).get(str(name))
        except KeyError as err:
            raise ConfigError(f"{key}: {err.args[0]}") from None
    for which, group in (("image_encoder", "fedvlm.image_encoders"), ("text_encoder", "fedvlm.text_encoders")):
        encoder = cfg.model[which]
        registry = registry_of(group)
        if registry.options_of(encoder.name) is not None:
            given = OmegaConf.to_container(encoder.options) if encoder.options else {}
            spec = registry.spec({"name": encoder.name, **given}, f"model.{which}.options")  # type: ignore[dict-item]
            encoder.options = {k: v for k, v in spec.items() if k != "name"}
    for key, group in COMPONENTS.items():  # checks that need the whole run (e.g. Krum's clients per round)
        spec = OmegaConf.select(cfg, key)
        check = getattr(registry_of(group).get(spec.name), "check_config", None)
        if check is not None:
            check(spec, cfg)


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved config as YAML (reloadable with :func:`load_config`)."""
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _reason(err: OmegaConfBaseException) -> str:
    return str(err).splitlines()[0]
