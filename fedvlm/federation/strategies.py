"""Aggregation strategies, registered by name with their options
(``federation.strategy: {name: fedprox, mu: 0.01}``; a bare ``federation.strategy: fedavg`` works too).

A strategy is an :class:`~fedvlm.federation.aggregation.Aggregator`: it says what it adds to
each client's round config and how decoded client updates become the next global state. FedAvg's
weighted mean is Flower's own ``aggregate_arrayrecords``; FedProx is FedAvg plus μ in the client
config, because the proximal term is applied on the client
(:class:`~fedvlm.federation.callback.FederatedRoundCallback`). The Byzantine-robust strategies
(``trimmed_mean``, ``median``, ``krum``, ``multikrum``) apply the rules of
:mod:`fedvlm.federation.robust` and send μ too when their ``mu`` is positive. Each strategy
declares its options as a dataclass beside it; a new strategy is one registered class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from omegaconf import DictConfig
from typing_extensions import override

from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation import keys, robust
from fedvlm.federation.aggregation import Aggregator, ClientUpdate, RoundReplies, State
from fedvlm.registry import Registry

strategies: Registry[Aggregator] = Registry("strategy")
"""Strategy name (``federation.strategy.name``) → :class:`Aggregator` class."""


def _updates(values: list[tuple[int, float]]) -> RoundReplies:
    """Doctest helper: replies of clients ``(num_examples, w)`` with a one-entry state."""
    return RoundReplies([ClientUpdate(i, n, {"w": torch.tensor([w])}) for i, (n, w) in enumerate(values)], failed={})


def _check_mu(mu: float) -> None:
    if mu < 0:
        raise ValueError(f"mu={mu} must be >= 0")


@strategies.register("fedavg")
class FedAvg(Aggregator):
    """FedAvg (McMahan et al. 2017), Eq. 4 of Fed-MMX: ``θ = Σ_k (n_k / n) θ_k``.

    Under secure aggregation only ``Σ n_k Δ_k / Σ n_k`` arrives; FedAvg is then the global
    state plus that mean delta.

    Example:
        >>> FedAvg().aggregate(_updates([(1, 0.0), (3, 4.0)]), {"w": torch.zeros(1)})["w"]
        tensor([3.])
    """

    linear = True

    @override
    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        if replies.mean_delta is not None:  # secure aggregation: the sum is all the server learns
            return {k: global_state[k].double() + delta for k, delta in replies.mean_delta.items()}
        updates = self.require_updates(replies)
        records = [
            RecordDict(
                {
                    keys.ARRAYS: ArrayRecord(torch_state_dict=update.state),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: update.num_examples}),
                }
            )
            for update in updates
        ]
        averaged = aggregate_arrayrecords(records, keys.NUM_EXAMPLES).to_torch_state_dict()
        reference = updates[0].state
        return {key: value.to(reference[key].dtype) for key, value in averaged.items()}


@dataclass
class ProximalOptions:
    """FedProx's μ: clients add ``μ/2 ‖w − w_global‖²`` to their loss (0: none)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        _check_mu(self.mu)


@strategies.register("fedprox", options=ProximalOptions)
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; clients add ``μ/2 ‖w − w_global‖²``.

    Args:
        mu: μ, sent to every client each round.
    """

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = mu

    @override
    def configure_round(self, server_round: int) -> dict[str, Any]:
        return {keys.PROXIMAL_MU: float(self.mu)}


@dataclass
class ServerMomentumOptions:
    """FedAvgM: η, the server's step along the momentum, and β, the momentum (β = 0, η = 1: FedAvg)."""

    server_learning_rate: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate={self.server_learning_rate} must be positive")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server_momentum={self.server_momentum} must be in [0, 1)")


@strategies.register("fedavgm", options=ServerMomentumOptions)
class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu, Qi & Brown 2019), as Flower's ``FedAvgM``.

    The round's FedAvg aggregate defines a pseudo-gradient ``Δ = w − w_avg``; the server keeps
    ``v ← β·v + Δ`` and moves ``w ← w − η·v``. With β = 0 and η = 1 this is FedAvg. Momentum lets
    the global model keep the direction of several rounds, which helps when each round's local
    training moves it only a little (many clients with few local steps each). The aggregate is
    still the weighted mean (``linear``): momentum only post-processes it.

    Args:
        server_learning_rate: η.
        server_momentum: β in [0, 1).

    Example:
        >>> strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
        >>> w = strategy.server_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])})
        >>> w["w"]  # v = 0.5
        tensor([0.5000])
        >>> strategy.server_update(w, {"w": torch.tensor([0.3])})["w"]  # v = 0.9·0.5 + 0.2
        tensor([-0.1500])
    """

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9) -> None:
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.velocity: State = {}

    @override
    def server_update(self, previous: State, aggregated: State) -> State:
        updated = {}
        for key, value in aggregated.items():
            if not value.is_floating_point():
                updated[key] = value
                continue
            pseudo_gradient = previous[key].double() - value.double()
            velocity = self.velocity.get(key)
            velocity = pseudo_gradient if velocity is None else self.server_momentum * velocity + pseudo_gradient
            self.velocity[key] = velocity
            updated[key] = (previous[key].double() - self.server_learning_rate * velocity).to(value.dtype)
        return updated

    @override
    def state_dict(self) -> State:
        return {f"velocity.{key}": value for key, value in self.velocity.items()}

    @override
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.velocity = {key.removeprefix("velocity."): value.double() for key, value in state.items()}


@dataclass
class RobustOptions:
    """Options every robust strategy takes: FedProx's μ sent to clients (0: no proximal term)."""

    mu: float = 0.0

    def __post_init__(self) -> None:
        _check_mu(self.mu)


class RobustStrategy(Aggregator):
    """Base of the Byzantine-robust strategies: optional FedProx term, round bookkeeping.

    Args:
        mu: μ sent to every client (FedProx's client term, Li et al. 2020); 0 sends none.
    """

    def __init__(self, mu: float = 0.0) -> None:
        self.mu = mu
        self.server_round = 0

    @override
    def configure_round(self, server_round: int) -> dict[str, Any]:
        # The round loop configures each round before aggregating it: remember the round so that
        # aggregation errors can name it.
        self.server_round = server_round
        return {keys.PROXIMAL_MU: float(self.mu)} if self.mu > 0 else {}

    @override
    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        return self.combine([update.state for update in self.require_updates(replies)])

    def combine(self, states: list[State]) -> State:
        """The robust aggregate of the decoded client states (unweighted)."""
        raise NotImplementedError


@dataclass
class TrimmedMeanOptions(RobustOptions):
    """``trim_fraction``: β, the fraction of client values trimmed per side and coordinate."""

    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={self.trim_fraction} must be in [0, 0.5)")


@strategies.register("trimmed_mean", options=TrimmedMeanOptions)
class TrimmedMean(RobustStrategy):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018); see :func:`robust.trimmed_mean`.

    Tolerates fewer than ``⌊β·n⌋`` Byzantine clients per coordinate.

    Example:
        >>> replies = _updates([(1, 1.0), (1, 2.0), (1, 3.0), (1, 9e9)])
        >>> TrimmedMean(trim_fraction=0.25).aggregate(replies, {"w": torch.zeros(1)})["w"]
        tensor([2.5000])
    """

    def __init__(self, trim_fraction: float = 0.2, mu: float = 0.0) -> None:
        super().__init__(mu)
        self.trim_fraction = trim_fraction

    @override
    def combine(self, states: list[State]) -> State:
        return robust.trimmed_mean(states, self.trim_fraction)


@strategies.register("median", options=RobustOptions)
class Median(RobustStrategy):
    """Coordinate-wise median (Yin et al. 2018), as Flower's ``FedMedian``."""

    @override
    def combine(self, states: list[State]) -> State:
        return robust.coordinate_median(states)


@dataclass
class KrumOptions(RobustOptions):
    """``byzantine_f``: f, the assumed number of Byzantine clients (each round needs n > 2f + 2)."""

    byzantine_f: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.byzantine_f < 0:
            raise ValueError(f"byzantine_f={self.byzantine_f} must be >= 0")


@dataclass
class MultiKrumOptions(KrumOptions):
    """``num_selected``: m, the number of best-scored updates averaged (0: n − f)."""

    num_selected: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_selected < 0:
            raise ValueError(f"num_selected={self.num_selected} must be >= 0")


@strategies.register("multikrum", options=MultiKrumOptions)
class MultiKrum(RobustStrategy):
    """Krum (``num_selected=1``) and Multi-Krum (Blanchard et al. 2017).

    Args:
        byzantine_f: f, the assumed number of Byzantine clients; each round needs ``n > 2f + 2``
            updates.
        num_selected: m, how many of the best-scored updates are averaged; 0 means ``n − f``.
            At most ``n − f`` of the ``n`` updates that arrived are used.
        mu: See :class:`RobustStrategy`.
    """

    def __init__(self, byzantine_f: int = 0, num_selected: int = 0, mu: float = 0.0) -> None:
        super().__init__(mu)
        self.byzantine_f = byzantine_f
        self.num_selected = num_selected

    @classmethod
    def check_config(cls, options: Mapping[str, Any], cfg: DictConfig) -> None:
        """Refuse a federation that asks too few clients per round for f (and m)."""
        federation = cfg.federation
        asked = federation.clients_per_round or federation.num_clients - len(set(federation.exclude_clients))
        f = int(options["byzantine_f"])
        name = federation.strategy.name
        if asked <= 2 * f + 2:
            raise ConfigError(
                f"federation.strategy={name} needs more than 2·federation.strategy.byzantine_f + 2 = {2 * f + 2} "
                f"clients per round (byzantine_f={f}); {asked} are asked (num_clients={federation.num_clients}, "
                f"clients_per_round={federation.clients_per_round}, exclude_clients={list(federation.exclude_clients)})"
            )
        selected = int(options.get("num_selected", 1))
        if selected > asked - f:
            raise ConfigError(f"federation.strategy.num_selected={selected} exceeds n − f = {asked} − {f}")

    @override
    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        updates = self.require_updates(replies)
        count, f = len(updates), self.byzantine_f
        if count <= 2 * f + 2:
            clients = ", ".join(str(u.partition_id) for u in updates) or "none"
            raise FederationError(
                f"round {self.server_round}: Krum needs more than 2·federation.strategy.byzantine_f + 2 = "
                f"{2 * f + 2} client updates (byzantine_f={f}), but {count} arrived (clients: {clients})"
            )
        return super().aggregate(replies, global_state)

    @override
    def combine(self, states: list[State]) -> State:
        honest = len(states) - self.byzantine_f
        selected = min(self.num_selected, honest) if self.num_selected > 0 else honest
        return robust.multikrum(states, self.byzantine_f, selected)


@strategies.register("krum", options=KrumOptions)
class Krum(MultiKrum):
    """Krum: the one update closest to its ``n − f − 2`` nearest neighbours (Blanchard et al. 2017)."""

    def __init__(self, byzantine_f: int = 0, mu: float = 0.0) -> None:
        super().__init__(byzantine_f, 1, mu)


__all__ = [
    "ClientUpdate",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "Krum",
    "Median",
    "MultiKrum",
    "RobustStrategy",
    "TrimmedMean",
    "strategies",
]
