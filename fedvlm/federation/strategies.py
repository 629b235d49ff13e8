"""Aggregation strategies, registered by name (``federation.strategy: fedprox``).

A strategy says what it adds to each client's round config and how decoded client states
become the next global state. FedAvg's weighted mean is Flower's own
``aggregate_arrayrecords``; FedProx wraps FedAvg and adds μ to the client config, because the
proximal term is applied on the client (:class:`~fedvlm.federation.callback.FederatedRoundCallback`).
The Byzantine-robust strategies (``trimmed_mean``, ``median``, ``krum``, ``multikrum``) apply the
rules of :mod:`fedvlm.federation.robust` and send μ too when ``federation.robust_proximal`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from typing_extensions import override

from fedvlm.errors import FederationError
from fedvlm.federation import keys, robust
from fedvlm.registry import Registry

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round, after decoding.

    Attributes:
        partition_id: The client (its data partition).
        num_examples: Local training examples (the FedAvg weight ``n_k``).
        state: The trained values of the keys that travelled.
        metrics: Scalar training metrics the client reported.
    """

    partition_id: int
    num_examples: int
    state: State
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """Turns client updates into the next global state."""

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Entries this strategy adds to the round's client config."""
        ...

    def aggregate(self, updates: Sequence[ClientUpdate]) -> State:
        """The aggregated state over the keys the updates carry."""
        ...

    def server_update(self, previous: State, aggregated: State) -> State:
        """The next global values of ``aggregated``'s keys, given the global state before the round.

        Called with the aggregate however it was formed (plain, under secure aggregation or
        central DP), so server-side optimisers see every round.
        """
        ...

    def state_dict(self) -> State:
        """What the strategy must carry across rounds (saved in checkpoints, for ``--resume``)."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""
        ...


class Stateless:
    """The server takes the aggregate as the new global state and keeps nothing between rounds."""

    def server_update(self, previous: State, aggregated: State) -> State:
        return aggregated

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise FederationError(
                f"{type(self).__name__} keeps no server state, but the checkpoint holds {sorted(state)[:3]}"
            )


class FedAvg(Stateless):
    """FedAvg (McMahan et al. 2017), Eq. 4 of Fed-MMX: ``θ = Σ_k (n_k / n) θ_k``.

    Example:
        >>> updates = [ClientUpdate(0, 1, {"w": torch.tensor([0.0, 4.0])}),
        ...            ClientUpdate(1, 3, {"w": torch.tensor([4.0, 0.0])})]
        >>> FedAvg().aggregate(updates)["w"]
        tensor([3., 1.])
    """

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {}

    def aggregate(self, updates: Sequence[ClientUpdate]) -> State:
        if not updates:
            raise ValueError("cannot aggregate zero client updates")
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


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg aggregation; clients add ``μ/2 ‖w − w_global‖²``.

    Args:
        proximal_mu: μ, sent to every client each round.
    """

    def __init__(self, proximal_mu: float) -> None:
        self.proximal_mu = proximal_mu

    def client_config(self, server_round: int) -> dict[str, Any]:
        return {keys.PROXIMAL_MU: float(self.proximal_mu)}


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu, Qi & Brown 2019), as Flower's ``FedAvgM``.

    The round's FedAvg aggregate defines a pseudo-gradient ``Δ = w − w_avg``; the server keeps
    ``v ← β·v + Δ`` and moves ``w ← w − η·v``. With β = 0 and η = 1 this is FedAvg. Momentum lets
    the global model keep the direction of several rounds, which helps when each round's local
    training moves it only a little (many clients with few local steps each).

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

    def __init__(self, server_learning_rate: float, server_momentum: float) -> None:
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


class RobustStrategy(Stateless):
    """Base of the Byzantine-robust strategies: optional FedProx term, round bookkeeping.

    Args:
        proximal_mu: μ sent to every client (FedProx's client term, Li et al. 2020); 0 sends none.
    """

    def __init__(self, proximal_mu: float = 0.0) -> None:
        self.proximal_mu = proximal_mu
        self.server_round = 0

    def client_config(self, server_round: int) -> dict[str, Any]:
        # The round loop asks for the client config once per round, before aggregating: remember
        # the round so that aggregation errors can name it.
        self.server_round = server_round
        return {keys.PROXIMAL_MU: float(self.proximal_mu)} if self.proximal_mu > 0 else {}

    def aggregate(self, updates: Sequence[ClientUpdate]) -> State:
        if not updates:
            raise ValueError("cannot aggregate zero client updates")
        return self.combine([update.state for update in updates])

    def combine(self, states: Sequence[State]) -> State:
        """The robust aggregate of the decoded client states (unweighted)."""
        raise NotImplementedError


class TrimmedMean(RobustStrategy):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018); see :func:`robust.trimmed_mean`.

    Tolerates fewer than ``⌊β·n⌋`` Byzantine clients per coordinate.

    Example:
        >>> updates = [ClientUpdate(i, 1, {"w": torch.tensor([v])}) for i, v in enumerate([1.0, 2.0, 3.0, 9e9])]
        >>> TrimmedMean(0.25).aggregate(updates)["w"]
        tensor([2.5000])
    """

    def __init__(self, trim_fraction: float, proximal_mu: float = 0.0) -> None:
        super().__init__(proximal_mu)
        self.trim_fraction = trim_fraction

    @override
    def combine(self, states: Sequence[State]) -> State:
        return robust.trimmed_mean(states, self.trim_fraction)


class Median(RobustStrategy):
    """Coordinate-wise median (Yin et al. 2018), as Flower's ``FedMedian``."""

    @override
    def combine(self, states: Sequence[State]) -> State:
        return robust.coordinate_median(states)


class MultiKrum(RobustStrategy):
    """Krum (``num_selected=1``) and Multi-Krum (Blanchard et al. 2017).

    Args:
        byzantine_f: f, the assumed number of Byzantine clients; each round needs ``n > 2f + 2``
            updates.
        num_selected: m, how many of the best-scored updates are averaged; 0 means ``n − f``.
            At most ``n − f`` of the ``n`` updates that arrived are used.
        proximal_mu: See :class:`RobustStrategy`.
    """

    def __init__(self, byzantine_f: int, num_selected: int = 1, proximal_mu: float = 0.0) -> None:
        super().__init__(proximal_mu)
        self.byzantine_f = byzantine_f
        self.num_selected = num_selected

    @override
    def aggregate(self, updates: Sequence[ClientUpdate]) -> State:
        count, f = len(updates), self.byzantine_f
        if count <= 2 * f + 2:
            clients = ", ".join(str(u.partition_id) for u in updates) or "none"
            raise FederationError(
                f"round {self.server_round}: Krum needs more than 2·federation.byzantine_f + 2 = {2 * f + 2} "
                f"client updates (federation.byzantine_f={f}), but {count} arrived (clients: {clients})"
            )
        return super().aggregate(updates)

    @override
    def combine(self, states: Sequence[State]) -> State:
        honest = len(states) - self.byzantine_f
        selected = min(self.num_selected, honest) if self.num_selected > 0 else honest
        return robust.multikrum(states, self.byzantine_f, selected)


strategies: Registry[Strategy] = Registry("strategy")


@strategies.register("fedavg")
def make_fedavg(federation: Mapping[str, Any]) -> Strategy:
    """FedAvg weighted by client size."""
    return FedAvg()


@strategies.register("fedprox")
def make_fedprox(federation: Mapping[str, Any]) -> Strategy:
    """FedProx with ``federation.proximal_mu``."""
    return FedProx(float(federation["proximal_mu"]))


@strategies.register("fedavgm")
def make_fedavgm(federation: Mapping[str, Any]) -> Strategy:
    """FedAvg with server momentum ``federation.server_momentum`` and rate ``federation.server_learning_rate``."""
    return FedAvgM(float(federation["server_learning_rate"]), float(federation["server_momentum"]))


def _robust_mu(federation: Mapping[str, Any]) -> float:
    return float(federation["proximal_mu"]) if federation.get("robust_proximal", False) else 0.0


@strategies.register("trimmed_mean")
def make_trimmed_mean(federation: Mapping[str, Any]) -> Strategy:
    """Coordinate-wise trimmed mean with β = ``federation.trim_fraction``."""
    return TrimmedMean(float(federation["trim_fraction"]), _robust_mu(federation))


@strategies.register("median")
def make_median(federation: Mapping[str, Any]) -> Strategy:
    """Coordinate-wise median."""
    return Median(_robust_mu(federation))


@strategies.register("krum")
def make_krum(federation: Mapping[str, Any]) -> Strategy:
    """Krum with f = ``federation.byzantine_f``."""
    return MultiKrum(int(federation["byzantine_f"]), 1, _robust_mu(federation))


@strategies.register("multikrum")
def make_multikrum(federation: Mapping[str, Any]) -> Strategy:
    """Multi-Krum with f = ``federation.byzantine_f`` and m = ``federation.multikrum_m`` (0: n − f)."""
    return MultiKrum(int(federation["byzantine_f"]), int(federation["multikrum_m"]), _robust_mu(federation))
