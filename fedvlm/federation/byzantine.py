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

Only floating-point entries are attacked; integer buffers travel as trained. Label flipping turns
leukemia ``0 ↔ 1`` and stage ``k → K−1−k`` (unknown stage ``-1`` stays), and CXR multi-label
``labels`` ``0 ↔ 1`` (``nan`` unknowns stay).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


def flip_labels(bundle: Mapping[str, torch.Tensor], num_stages: int) -> Bundle:
    """A copy of ``bundle`` with its labels flipped; other tensors are shared, not copied.

    Leukemia bundles: ``leukemia`` ``0 ↔ 1`` and ``stage`` ``k → K−1−k`` for ``k ≥ 0`` (``-1``,
    no stage, stays). CXR bundles: ``labels`` ``0 ↔ 1``, ``nan`` (unknown) stays ``nan``.

    Args:
        bundle: A prepared training bundle.
        num_stages: K, the number of leukemia stages (``model.num_stages``).

    Raises:
        ValueError: If the bundle has no labels this function knows.

    Example:
        >>> flipped = flip_labels({"leukemia": torch.tensor([0, 1, 1]), "stage": torch.tensor([-1, 0, 3])}, 4)
        >>> flipped["leukemia"].tolist(), flipped["stage"].tolist()
        ([1, 0, 0], [-1, 3, 0])
    """
    flipped = dict(bundle)
    if "leukemia" in bundle:
        flipped["leukemia"] = 1 - bundle["leukemia"]
        stage = bundle["stage"]
        flipped["stage"] = torch.where(stage >= 0, num_stages - 1 - stage, stage)
    elif "labels" in bundle:
        flipped["labels"] = 1 - bundle["labels"]  # nan stays nan
    else:
        raise ValueError(f"label_flip: no leukemia/stage or labels in the bundle (keys: {sorted(bundle)})")
    return flipped


@dataclass(frozen=True)
class Attack:
    """What a malicious client does to its round; the base class is an honest client.

    Args:
        scale: s of ``sign_flip`` and ``scale``.
        noise_std: σ of ``gaussian``.
        num_stages: K of ``label_flip``.
    """

    scale: float = 1.0
    noise_std: float = 0.0
    num_stages: int = 0
    poisons_data = False
    """Whether the attack changes the training data (:meth:`poison_bundle`), not only the update."""

    def poison_bundle(self, bundle: Bundle) -> Bundle:
        """The training data the client trains on (the honest client: ``bundle``)."""
        return bundle

    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        """The state the client sends (the honest client: ``local``)."""
        return dict(local)

    def poison_training_data(self, bundle: Bundle) -> None:
        """Poison the client's cached training bundle **in place**, once per bundle object.

        The client's bundle is loaded once per process and reused across rounds (Flower
        simulation keeps its actors), so applying a self-inverse flip every round would undo it.
        """
        if _POISONED.get(id(bundle)) is bundle:
            return
        poisoned = self.poison_bundle(bundle)
        if poisoned is not bundle:
            bundle.update(poisoned)
            _POISONED[id(bundle)] = bundle

    def poison(self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], seed: int) -> State:
        """:meth:`poison_update` with a generator seeded by ``seed`` (round seed + partition id)."""
        return self.poison_update(local, global_state, torch.Generator().manual_seed(seed))


_POISONED: dict[int, Bundle] = {}
"""Bundles already poisoned in this process, by identity (the dict keeps them alive: no id reuse)."""


class SignFlip(Attack):
    """Sends :func:`sign_flip`."""

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return sign_flip(local, global_state, self.scale)


class ScaleUpdate(Attack):
    """Sends :func:`scale_update`."""

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return scale_update(local, global_state, self.scale)


class GaussianUpdate(Attack):
    """Sends :func:`gaussian_update`."""

    @override
    def poison_update(
        self, local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> State:
        return gaussian_update(local, global_state, self.noise_std, generator)


class LabelFlip(Attack):
    """Trains on :func:`flip_labels` and sends the result."""

    poisons_data = True

    @override
    def poison_bundle(self, bundle: Bundle) -> Bundle:
        return flip_labels(bundle, self.num_stages)


attacks: Registry[Attack] = Registry("attack")
"""Attack name (``federation.byzantine.attack``) → ``Attack`` class."""

for _name, _cls in {
    NO_ATTACK: Attack,
    "sign_flip": SignFlip,
    "scale": ScaleUpdate,
    "gaussian": GaussianUpdate,
    "label_flip": LabelFlip,
}.items():
    attacks.register(_name)(_cls)


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
    if settings.attack == NO_ATTACK:
        return []
    if settings.clients:
        return sorted(int(pid) for pid in settings.clients)
    count = math.floor(float(settings.fraction) * int(federation.num_clients) + 1e-9)
    rng = np.random.default_rng([int(seed), 0xB12A])
    return sorted(int(pid) for pid in rng.choice(int(federation.num_clients), size=count, replace=False))


def client_attack(cfg: DictConfig, partition_id: int) -> Attack:
    """The attack client ``partition_id`` runs under ``cfg.federation.byzantine`` (honest: a no-op)."""
    settings = cfg.federation.byzantine
    if partition_id not in byzantine_clients(cfg.federation, int(cfg.seed)):
        return Attack()
    attack_cls = attacks.get(str(settings.attack))
    return attack_cls(float(settings.scale), float(settings.noise_std), int(cfg.model.num_stages))


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
    "flip_labels",
    "gaussian_update",
    "scale_update",
    "sign_flip",
]
