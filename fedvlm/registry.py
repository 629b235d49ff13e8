"""Name → factory registries, in the spirit of timm's ``register_model`` / ``create_model``.

Recipes name components (``model.image_encoder.name: vit_micro``,
``federation.strategy: fedprox``, ``data.partition.name: dirichlet``); a :class:`Registry`
maps each name to the factory that builds it, and an unknown name fails listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A named collection of factories for one kind of component.

    Args:
        kind: What the registry holds, used in error messages (``"image encoder"``).

    Example:
        >>> partitioners: Registry[object] = Registry("partitioner")
        >>> @partitioners.register("iid")
        ... def make_iid() -> str:
        ...     return "iid!"
        >>> partitioners.create("iid")
        'iid!'
        >>> partitioners.get("dirichelt")
        Traceback (most recent call last):
        ...
        KeyError: "unknown partitioner 'dirichelt'; valid names: iid"
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name``.

        Raises:
            ValueError: If ``name`` is already registered.
        """

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
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
