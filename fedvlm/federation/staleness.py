"""Staleness weights of buffered asynchronous aggregation: ``s(τ)`` and each update's share α.

Eq. 31 of Fed-MMX weighs an update ``τ`` global versions stale by ``(N_c / N) · e^(−λτ)``;
``federation.staleness`` picks ``s`` (``exponential``: ``e^(−λτ)``; ``polynomial``: ``(1+τ)^−a``,
FedAsync's), :func:`buffer_weights` normalises within a buffer (FedBuff), and
:func:`duration_weights` (``federation.weight_by_duration``) scales by each task's duration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedvlm.registry import Registry


class StalenessWeight(Protocol):
    """``s(τ)``: the weight of an update ``τ`` versions stale, relative to a fresh one."""

    def __call__(self, staleness: int) -> float: ...


staleness_weights: Registry[StalenessWeight] = Registry("staleness function")
"""``federation.staleness.name`` → :class:`StalenessWeight` class."""


@dataclass
class ExponentialOptions:
    """``lam``: λ of ``e^(−λτ)`` (0: every update weighs the same)."""

    lam: float = 0.5

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam={self.lam} must be >= 0")


@staleness_weights.register("exponential", options=ExponentialOptions)
class ExponentialStaleness:
    """``s(τ) = e^(−λτ)`` (Eq. 31 of Fed-MMX).

    Example:
        >>> s = ExponentialStaleness(lam=0.5)
        >>> [round(s(tau), 4) for tau in (0, 1, 2)]
        [1.0, 0.6065, 0.3679]
    """

    def __init__(self, lam: float = 0.5) -> None:
        self.lam = lam

    def __call__(self, staleness: int) -> float:
        return math.exp(-self.lam * staleness)


@dataclass
class PolynomialOptions:
    """``a``: the exponent of ``(1 + τ)^−a`` (FedBuff's and FedAsync's choice; 0: no decay)."""

    a: float = 0.5

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"a={self.a} must be >= 0")


@staleness_weights.register("polynomial", options=PolynomialOptions)
class PolynomialStaleness:
    """``s(τ) = (1 + τ)^−a`` (Xie et al. 2019, FedAsync; Nguyen et al. 2022, FedBuff).

    Example:
        >>> s = PolynomialStaleness(a=0.5)
        >>> [round(s(tau), 4) for tau in (0, 1, 3)]
        [1.0, 0.7071, 0.5]
    """

    def __init__(self, a: float = 0.5) -> None:
        self.a = a

    def __call__(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.a)


def buffer_weights(buffered: Sequence[tuple[int, int]], staleness: StalenessWeight) -> list[float]:
    """α of each ``(N_c, τ_c)`` in a buffer: ``N_c · s(τ_c)``, normalised to sum to 1.

    Example:
        >>> [round(a, 4) for a in buffer_weights([(10, 0), (10, 1)], ExponentialStaleness(lam=math.log(3)))]
        [0.75, 0.25]
    """
    raw = [num_examples * staleness(tau) for num_examples, tau in buffered]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"a buffer's weights sum to {total}: every update has no examples or zero weight")
    return [w / total for w in raw]


def duration_weights(buffered: Sequence[tuple[int, float, int]], staleness: StalenessWeight) -> list[float]:
    """α of each ``(N_c, d_c / d̄, τ_c)`` in a buffer (``federation.weight_by_duration``):
    ``N_c · (d_c / d̄) · s(τ_c) / Σ N``, so they sum to the buffer's weighted mean of ``(d/d̄)·s(τ)``.

    A client whose task takes ``d`` sends ``T / d`` updates in a time ``T``; weighing each by ``d``
    makes its total weight over time ``∝ N_c``, as in FedAvg, however fast it is. The sum is not
    renormalised to 1, or a buffer of only fast clients (a common one) would take a full step:
    such a buffer moves the model by the share of time its work stands for. (Normalised within the
    buffer, Eq. 31 lets a client that is 40× faster than the median make most of the versions.)

    Example:
        >>> duration_weights([(10, 0.5, 0), (10, 0.5, 0)], ExponentialStaleness(lam=0.5))  # two quick updates
        [0.25, 0.25]
    """
    total = sum(num_examples for num_examples, _, _ in buffered)
    if total <= 0:
        raise ValueError(f"a buffer's example counts sum to {total}")
    return [n * relative * staleness(tau) / total for n, relative, tau in buffered]


__all__ = [
    "ExponentialStaleness",
    "PolynomialStaleness",
    "StalenessWeight",
    "buffer_weights",
    "duration_weights",
    "staleness_weights",
]
