"""Simulated Byzantine clients (``federation.byzantine``), to drill the robust strategies.

A malicious client runs the ordinary train handler; an :class:`Attack` wraps it from outside:
it may poison the client's training data before training and what the client sends after.
With ``w`` the global weights the client received, ``w_k`` its honestly trained weights,
``Δ = w_k − w`` and ``s``/``σ`` from the config, the client sends:

========== ===================================== =============================================
attack     sent state                            reference
========== ===================================== =============================================
sign_flip  ``w − s·Δ``                           reversed gradient (Damaskinos et al. 2018)
scale      ``w + s·Δ``                           boosting (Bhagoji et al. 2019)
gaussian   ``w + N(0, σ²)`` (training ignored)   Gaussian attack (Blanchard et al. 2017)
label_flip ``w_k`` trained on flipped labels     label flipping (Fang et al. 2020)
========== ===================================== =============================================

Only floating-point entries are attacked; integer buffers travel as trained. Label flipping asks
the task how its labels flip (:meth:`fedvlm.tasks.base.Task.flip_labels`): this module knows no
task's labels. Each attack is a dataclass whose fields are its options
(``federation.byzantine.attack: {name: sign_flip, scale: 4}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig
from typing_extensions import override

from fedvlm.data.prepared import Bundle
from fedvlm.registry import Registry

State = dict[str, torch.Tensor]

NO_ATTACK = "none"


def sign_flip(local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], scale: float) -> State:
    """``w − s·(w_k − w)``: the update reversed and scaled.

    Example:
        >>> sign_flip({"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}, 10.0)["w"]
        tensor([-19.])
    """
    return _per_float_entry(local, global_state, lambda w_k, w: w - scale * (w_k - w))


def scale_update(local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], scale: float) -> State:
    """``w + s·(w_k − w)``: the update boosted.

    Example:
        >>> scale_update({"w": torch.tensor([3.0])}, {"w": torch.tensor([1.0])}, 10.0)["w"]
        tensor([21.])
    """
    return _per_float_entry(local, global_state, lambda w_k, w: w + scale * (w_k - w))


def gaussian_update(
    local: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    noise_std: float,
    generator: torch.Generator,
) -> State:
    """``w + N(0, σ²)`` per coordinate; the local training is thrown away.

    Args:
        local: The trained state (its keys are sent; its integer entries are kept).
        global_state: The global weights the client received.
        noise_std: σ.
        generator: Draws the noise (seeded per round and client, so runs repeat).
    """
    return _per_float_entry(
        local,
        global_state,
        lambda w_k, w: w + noise_std * torch.randn(w.shape, generator=generator, dtype=torch.float64),
    )


LabelFlipper = Callable[[Bundle], Bundle]
"""The task's own label flip (:meth:`fedvlm.tasks.base.Task.flip_labels`): the attack knows no labels."""


@dataclass(frozen=True)
class Attack:
    """What a malicious client does to its round; the base class is an honest client.

    Attacks are registered with their options (``federation.byzantine.attack: {name: scale,
    scale: 10}``): each subclass is a dataclass whose fields are its options.
    """

    poisons_data: ClassVar[bool] = False
    """Whether the attack changes the training data (:meth:`poison_bundle`), not only the update."""

    def poison_bundle(self, bundle: Bundle, flip_labels: LabelFlipper) -> Bundle:
        """The training data the client trains on (the honest client: ``bundle``)."""
        return bundle

    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        """The state the client sends (the honest client: ``local``)."""
        return dict(local)

    def poison_training_data(self, bundle: Bundle, flip_labels: LabelFlipper) -> None:
        """Poison the client's cached training bundle **in place**, once per bundle object.

        The client's bundle is loaded once per process and reused across rounds (Flower
        simulation keeps its actors), so applying a self-inverse flip every round would undo it.
        """
        if _POISONED.get(id(bundle)) is bundle:
            return
        poisoned = self.poison_bundle(bundle, flip_labels)
        if poisoned is not bundle:
            bundle.update(poisoned)
            _POISONED[id(bundle)] = bundle

    def poison(self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], seed: int) -> State:
        """:meth:`poison_update` with a generator seeded by ``seed`` (round seed + partition id)."""
        return self.poison_update(local, global_state, torch.Generator().manual_seed(seed))


_POISONED: dict[int, Bundle] = {}
"""Bundles already poisoned in this process, by identity (the dict keeps them alive: no id reuse)."""

attacks: Registry[Attack] = Registry("attack")
"""Attack name (``federation.byzantine.attack.name``) → ``Attack`` class (its fields: the options)."""
attacks.register(NO_ATTACK)(Attack)


@dataclass(frozen=True)
class SignFlip(Attack):
    """Sends :func:`sign_flip` with ``scale`` s."""

    scale: float = 10.0

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return sign_flip(local, global_state, self.scale)


@dataclass(frozen=True)
class ScaleUpdate(Attack):
    """Sends :func:`scale_update` with ``scale`` s."""

    scale: float = 10.0

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return scale_update(local, global_state, self.scale)


@dataclass(frozen=True)
class GaussianUpdate(Attack):
    """Sends :func:`gaussian_update` with ``noise_std`` σ."""

    noise_std: float = 1.0

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be >= 0")

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return gaussian_update(local, global_state, self.noise_std, generator)


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Trains on labels flipped by the task (:meth:`fedvlm.tasks.base.Task.flip_labels`) and sends the result."""

    poisons_data: ClassVar[bool] = True

    @override
    def poison_bundle(self, bundle: Bundle, flip_labels: LabelFlipper) -> Bundle:
        return flip_labels(bundle)


for _name, _cls in {
    "sign_flip": SignFlip,
    "scale": ScaleUpdate,
    "gaussian": GaussianUpdate,
    "label_flip": LabelFlip,
}.items():
    attacks.register(_name, options=_cls)(_cls)


def byzantine_clients(federation: Any, seed: int) -> list[int]:
    """The malicious partition ids: ``byzantine.clients``, else ``⌊fraction·num_clients⌋`` drawn
    with ``seed`` (the same clients in every round and on every node); none when ``attack=none``.

    Example:
        >>> from fedvlm.config import load_config
        >>> cfg = load_config(None, ["federation.byzantine.attack=sign_flip", "federation.byzantine.fraction=0.2"])
        >>> byzantine_clients(cfg.federation, cfg.seed)
        [2, 3]
    """
    settings = federation.byzantine
    if settings.attack.name == NO_ATTACK:
        return []
    if settings.clients:
        return sorted(int(pid) for pid in settings.clients)
    count = math.floor(float(settings.fraction) * int(federation.num_clients) + 1e-9)
    rng = np.random.default_rng([int(seed), 0xB12A])
    return sorted(int(pid) for pid in rng.choice(int(federation.num_clients), size=count, replace=False))


def client_attack(cfg: DictConfig, partition_id: int) -> Attack:
    """The attack client ``partition_id`` runs under ``cfg.federation.byzantine`` (honest: a no-op)."""
    if partition_id not in byzantine_clients(cfg.federation, int(cfg.seed)):
        return Attack()
    return attacks.build(cfg.federation.byzantine.attack)


def _per_float_entry(
    local: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> State:
    """Apply ``rule(w_k, w)`` in float64 to the floating-point entries; keep the others as trained."""
    attacked: State = {}
    for key, value in local.items():
        if value.is_floating_point():
            w_k, w = value.detach().cpu().double(), global_state[key].detach().cpu().double()
            attacked[key] = rule(w_k, w).to(value.dtype)
        else:
            attacked[key] = value
    return attacked


__all__ = [
    "Attack",
    "attacks",
    "byzantine_clients",
    "client_attack",
    "gaussian_update",
    "scale_update",
    "sign_flip",
]
