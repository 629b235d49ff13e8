"""Name → factory registries, in the spirit of timm's ``register_model`` / ``create_model``.

Recipes name components (``federation.strategy: {name: fedprox, mu: 0.01}``,
``data.partition: {name: dirichlet, alpha: 0.5}``, ``federation.codec: fp16``); a
:class:`Registry` maps each name to the factory that builds it, and an unknown name fails listing
the valid ones. A component with options declares them as a dataclass when it registers
(``options=``): the config is checked against it when it is loaded (unknown option, wrong type,
value out of range: a :class:`~fedvlm.errors.ConfigError` naming the key), and the factory
receives the options as keyword arguments. Adding a component with options is one file.

Third-party packages add components through Python entry points, one group per registry
(:data:`PLUGIN_GROUPS`): an entry point names a module whose import registers its components,
and :func:`load_plugins` imports them all before any config is validated or component created.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from fedvlm.errors import ConfigError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PLUGIN_GROUPS: dict[str, str] = {
    "fedvlm.strategies": "fedvlm.federation.strategies:strategies",
    "fedvlm.codecs": "fedvlm.federation.codecs:update_codecs",
    "fedvlm.partitioners": "fedvlm.data.partition:partitioners",
    "fedvlm.image_encoders": "fedvlm.models.encoders:image_encoders",
    "fedvlm.text_encoders": "fedvlm.models.encoders:text_encoders",
    "fedvlm.fusions": "fedvlm.models.fusion:fusions",
    "fedvlm.attacks": "fedvlm.federation.byzantine:attacks",
    "fedvlm.tasks": "fedvlm.tasks.builtin:tasks",
    "fedvlm.staleness": "fedvlm.federation.staleness:staleness_weights",
    "fedvlm.client_speeds": "fedvlm.federation.clock:client_speeds",
}
"""Entry-point group → the registry its plugins register into (``module:attribute``)."""


class Registry(Generic[T]):
    """A named collection of factories for one kind of component.

    Args:
        kind: What the registry holds, used in error messages (``"image encoder"``).

    Example:
        >>> @dataclasses.dataclass
        ... class SkewOptions:
        ...     alpha: float = 0.5
        >>> partitioners: Registry[object] = Registry("partitioner")
        >>> @partitioners.register("skew", options=SkewOptions)
        ... def make_skew(alpha: float) -> str:
        ...     return f"skew({alpha})"
        >>> spec = partitioners.spec({"name": "skew", "alpha": 2}, "data.partition")
        >>> spec, partitioners.build(spec)
        ({'name': 'skew', 'alpha': 2.0}, 'skew(2.0)')
        >>> partitioners.spec({"name": "skew", "beta": 1}, "data.partition")
        Traceback (most recent call last):
        ...
        fedvlm.errors.ConfigError: data.partition.beta: not an option of partitioner 'skew' (options: alpha)
        >>> partitioners.get("skwe")
        Traceback (most recent call last):
        ...
        KeyError: "unknown partitioner 'skwe'; valid names: skew"
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._options: dict[str, type | None] = {}

    def register(self, name: str, options: type | None = None) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name``.

        Args:
            name: The name recipes use.
            options: A dataclass of the component's options (defaults for every field); its
                ``__post_init__`` may raise ``ValueError`` for a value out of range. The factory
                is called with the fields as keyword arguments. None: no options.

        Raises:
            ValueError: If ``name`` is already registered.
        """
        if options is not None and not dataclasses.is_dataclass(options):
            raise TypeError(f"{self.kind} {name!r}: options must be a dataclass, got {options!r}")

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            self._options[name] = options
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``.

        Raises:
            KeyError: Naming the unknown ``name`` and listing the valid ones.
        """
        try:
            return self._factories[name]
        except KeyError:
            valid = ", ".join(sorted(self._factories)) or "(none registered)"
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def options_of(self, name: str) -> type | None:
        """The options dataclass ``name`` declared (None: it takes none)."""
        self.get(name)
        return self._options[name]

    def spec(self, value: Any, key: str) -> dict[str, Any]:
        """A component setting as ``{name, **options}``, every option present and checked.

        Args:
            value: A bare name (``"fedprox"``) or a mapping with ``name`` and options.
            key: The config key, for error messages (``federation.strategy``).

        Raises:
            ConfigError: Unknown name (listing the valid ones), unknown option (listing the valid
                ones), a value of the wrong type or out of range; each naming the key.
        """
        if isinstance(value, str):
            given: dict[str, Any] = {"name": value}
        elif isinstance(value, Mapping):
            given = dict(value)
        else:
            raise ConfigError(f"{key}={value!r}: expected a {self.kind} name or a mapping with a name")
        name = given.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"{key}: a {self.kind} setting needs a name, e.g. {{name: {self.names()[0]}, ...}}")
        try:
            options = self.options_of(name)
        except KeyError as err:
            raise ConfigError(f"{key}: {err.args[0]}") from None
        fields = {f.name: f for f in dataclasses.fields(options)} if options else {}
        for option in given:
            if option not in fields:
                valid = ", ".join(fields) or "none"
                raise ConfigError(f"{key}.{option}: not an option of {self.kind} {name!r} (options: {valid})")
        if options is None:
            return {"name": name}
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            typed = OmegaConf.merge(OmegaConf.structured(options), given)
            instance = OmegaConf.to_object(typed)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
        except ValueError as err:  # a range check in the options' __post_init__
            raise ConfigError(f"{key}.{err}") from None
        return {"name": name, **{f: getattr(instance, f) for f in fields}}

    def build(self, spec: Mapping[str, Any], *args: Any, **kwargs: Any) -> T:
        """Build the component ``spec`` (a :meth:`spec` result or a bare-name mapping) describes:
        ``factory(*args, **kwargs, **options)``."""
        options = {k: v for k, v in spec.items() if k != "name"}
        return self.get(str(spec["name"]))(*args, **kwargs, **options)

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build the component registered under ``name``."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._factories)


def registry_of(group: str) -> Registry[Any]:
    """The registry behind entry-point group ``group`` (importing its module)."""
    module, _, attribute = PLUGIN_GROUPS[group].partition(":")
    registry: Registry[Any] = getattr(importlib.import_module(module), attribute)
    return registry


_LOADED: set[tuple[str, str]] = set()


def load_plugins() -> None:
    """Import every installed plugin (entry points of :data:`PLUGIN_GROUPS`), once per process.

    An entry point's name is the component's name and its value the module that registers it
    (``[project.entry-points."fedvlm.strategies"] fedsgd = "mypkg.fedsgd"``).

    Raises:
        ConfigError: If a plugin cannot be imported or does not register the name it declares.
    """
    for group in PLUGIN_GROUPS:
        for entry in entry_points(group=group):
            if (group, entry.name) in _LOADED:
                continue
            try:
                entry.load()
            except Exception as err:  # a broken plugin must say which one
                raise ConfigError(f"plugin {entry.name!r} ({group} = {entry.value!r}) failed to import: {err}") from err
            registry = registry_of(group)
            if entry.name not in registry:
                raise ConfigError(
                    f"plugin {entry.name!r} ({group} = {entry.value!r}) did not register a {registry.kind} "
                    f"named {entry.name!r}"
                )
            _LOADED.add((group, entry.name))
