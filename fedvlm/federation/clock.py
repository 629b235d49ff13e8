"""Simulated heterogeneity on a virtual clock: how fast each client is, and which vanish.

On two cores wall time says nothing about a network of hospitals, so both round loops keep a
**virtual clock**. A client given work at time ``t`` (the global model and a round config)
finishes at ``t + d`` with

    d = speed_c · local_epochs · n_c / n̄,

``speed_c`` its compute-time factor (``federation.client_speed``), ``n_c`` its training
examples and ``n̄`` the mean over the run's clients: one time unit is one local epoch of a
typical client at speed 1. With probability ``federation.dropout`` the client vanishes instead,
at a uniformly drawn fraction of ``d`` (the SuperLink notices a node that stops sending
heartbeats; its work is lost, and its node state is as before the task).

A synchronous round lasts as long as its slowest sampled client (or until its last vanished one
is noticed); the asynchronous loop (:mod:`fedvlm.federation.asynchronous`) advances the clock
from one completion to the next. Every draw is seeded by ``(seed, client, task)``, so a resumed
run sees the same clients at the same speeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedvlm.registry import Registry

SPEED_STREAM = 7_919
"""Seed stream of the clients' speed factors (apart from sampling and training seeds)."""
DROPOUT_STREAM = 104_729
"""Seed stream of the vanishing draws."""

VANISHED = "vanished before replying (federation.dropout)"
"""Why a client that the virtual clock made vanish is missing from its round."""


class ClientSpeed(Protocol):
    """Gives every client a compute-time factor (larger: slower)."""

    def factors(self, partition_ids: Sequence[int], seed: int) -> dict[int, float]: ...


client_speeds: Registry[ClientSpeed] = Registry("client speed")
"""``federation.client_speed.name`` → :class:`ClientSpeed` class."""


@client_speeds.register("none")
class EqualSpeed:
    """Every client at speed 1: a task's duration follows its data alone."""

    def factors(self, partition_ids: Sequence[int], seed: int) -> dict[int, float]:
        return {int(pid): 1.0 for pid in partition_ids}


@dataclass
class LognormalOptions:
    """``sigma``: the spread of ``log speed`` (0: all equal; 1: the slowest of ten clients is
    typically ~10× slower than the fastest)."""

    sigma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma <= 5.0:
            raise ValueError(f"sigma={self.sigma} must be in [0, 5]")


@client_speeds.register("lognormal", options=LognormalOptions)
class LognormalSpeed:
    """``speed_c = e^(σ·z_c)`` with ``z_c ~ N(0, 1)`` seeded per client (median 1).

    Example:
        >>> speeds = LognormalSpeed(sigma=1.0).factors([0, 1, 2], seed=0)
        >>> speeds == LognormalSpeed(sigma=1.0).factors([2, 1, 0], seed=0)  # a client's own draw
        True
        >>> LognormalSpeed(sigma=0.0).factors([0, 1], seed=0)
        {0: 1.0, 1: 1.0}
    """

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def factors(self, partition_ids: Sequence[int], seed: int) -> dict[int, float]:
        # One generator per client: a client's speed does not depend on who else is registered.
        return {
            int(pid): math.exp(
                self.sigma * float(np.random.default_rng([seed, SPEED_STREAM, int(pid)]).standard_normal())
            )
            for pid in partition_ids
        }


@dataclass(frozen=True)
class Task:
    """One piece of work given to a client on the virtual clock.

    Attributes:
        partition_id: The client.
        start: When it received the global model.
        finish: When its reply arrives, or when it is noticed to have vanished.
        vanished: The client drops out instead of replying.
    """

    partition_id: int
    start: float
    finish: float
    vanished: bool


class VirtualClock:
    """Durations and vanishing draws of client tasks (module docstring).

    Args:
        speeds: Partition id → compute-time factor.
        client_sizes: Partition id → training examples.
        local_epochs: Epochs of one task.
        dropout: Probability that a task's client vanishes.
        seed: The run's seed.

    Example:
        >>> clock = VirtualClock({0: 1.0, 1: 3.0}, {0: 10, 1: 30}, local_epochs=1, dropout=0.0, seed=0)
        >>> clock.duration(0), clock.duration(1)  # n̄ = 20
        (0.5, 4.5)
        >>> clock.task(1, start=2.0, task_index=7)
        Task(partition_id=1, start=2.0, finish=6.5, vanished=False)
    """

    def __init__(
        self,
        speeds: Mapping[int, float],
        client_sizes: Mapping[int, int],
        local_epochs: int,
        dropout: float,
        seed: int,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"federation.dropout={dropout} must be in [0, 1)")
        self.speeds = dict(speeds)
        self.client_sizes = dict(client_sizes)
        self.mean_size = max(sum(self.client_sizes.values()) / max(len(self.client_sizes), 1), 1e-12)
        self.local_epochs = local_epochs
        self.dropout = dropout
        self.seed = seed

    def duration(self, partition_id: int) -> float:
        """Virtual time of one task of ``partition_id`` when it does not vanish."""
        size = self.client_sizes[partition_id] / self.mean_size
        return self.speeds[partition_id] * self.local_epochs * size

    def task(self, partition_id: int, start: float, task_index: int) -> Task:
        """The task ``task_index`` of the run (a round in sync mode, a dispatch in async mode)."""
        duration = self.duration(partition_id)
        if self.dropout > 0:
            rng = np.random.default_rng([self.seed, DROPOUT_STREAM, task_index, partition_id])
            if rng.random() < self.dropout:
                return Task(partition_id, start, start + float(rng.random()) * duration, vanished=True)
        return Task(partition_id, start, start + duration, vanished=False)


def build_clock(
    federation: Mapping[str, object], client_sizes: Mapping[int, int], local_epochs: int, seed: int
) -> VirtualClock:
    """The virtual clock of a run from its ``federation`` config and the clients' sizes."""
    speed: ClientSpeed = client_speeds.build(federation["client_speed"])  # type: ignore[arg-type]
    return VirtualClock(
        speed.factors(sorted(client_sizes), seed),
        client_sizes,
        local_epochs,
        float(federation["dropout"]),  # type: ignore[arg-type]
        seed,
    )


__all__ = [
    "VANISHED",
    "ClientSpeed",
    "EqualSpeed",
    "LognormalSpeed",
    "Task",
    "VirtualClock",
    "build_clock",
    "client_speeds",
]
