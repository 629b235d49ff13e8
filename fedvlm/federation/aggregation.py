"""The aggregation pipeline: one interface from a round's client replies to the next global state.

An :class:`Aggregator` configures a round (what it adds to every client's round config),
collects the round's replies (by default the plain train exchange the round loop offers),
aggregates them, applies its server update, reports round metrics and keeps state for resume.
Strategies (:mod:`fedvlm.federation.strategies`) implement it; secure aggregation
(:class:`fedvlm.federation.secure.SecureAggregation`) and central DP
(:class:`fedvlm.federation.central_dp.CentralDP`) **wrap** an aggregator, the way Flower composes
``DifferentialPrivacyServerSideFixedClipping(strategy)``, so the round loop makes exactly one
``collect`` and one ``aggregate`` call whatever is switched on (:func:`fedvlm.federation.pipeline.build_aggregator`).

Declared properties replace lists of compatible names: ``linear`` says the aggregate is the
example-weighted mean of the updates, so it can be computed from their sum alone (what SecAgg+
reveals) and is what central DP's noise is calibrated for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fedvlm.errors import FederationError

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round, after decoding.

    Attributes:
        partition_id: The client (its data partition).
        num_examples: Local training examples (the FedAvg weight ``n_k``).
        state: The trained values of the keys that travelled (empty when only the sum of the
            updates was revealed: secure aggregation).
        metrics: Scalar training metrics the client reported.
    """

    partition_id: int
    num_examples: int
    state: State
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class RoundReplies:
    """What the server received in a round's training exchange.

    Attributes:
        updates: The clients that answered, in partition order.
        failed: Per partition id, why the client is left out.
        bytes_sent: Bytes of every message the server sent.
        bytes_received: Bytes of every reply.
        mean_delta: Under secure aggregation, all the server learns of the updates: the weighted
            mean of ``local − global`` over ``updates`` (whose states are then empty). None when
            each update arrived on its own.
        completed: False when a secure round could not unmask the sum (nothing was learnt).
    """

    updates: list[ClientUpdate]
    failed: dict[int, str]
    bytes_sent: int = 0
    bytes_received: int = 0
    mean_delta: State | None = None
    completed: bool = True

    @property
    def answered(self) -> int:
        """The clients whose update reached the aggregate."""
        return len(self.updates) if self.completed else 0


class Exchange(Protocol):
    """What the round loop offers an aggregator to reach the round's clients."""

    grid: Any
    nodes: Mapping[int, int]
    reference: Mapping[str, torch.Tensor]
    client_sizes: Mapping[int, int]
    timeout: float

    def train(self, contents: Mapping[int, Any]) -> RoundReplies:
        """Send each sampled client its train message; decode every reply."""
        ...


class Aggregator:
    """Turns a round's client replies into the next global state.

    Subclasses implement :meth:`aggregate`; everything else has a default: no round config, the
    plain exchange, the aggregate taken as the new global state, no state between rounds.
    """

    linear: ClassVar[bool] = False
    """The aggregate is the example-weighted mean of the updates: computable from their sum alone
    (secure aggregation) and the aggregate central DP's noise calibration covers."""

    def configure_round(self, server_round: int) -> dict[str, Any]:
        """Entries this aggregator adds to the round's client config (e.g. FedProx's μ)."""
        return {}

    def collect(self, exchange: Exchange, contents: Mapping[int, Any], server_round: int) -> RoundReplies:
        """Run the round's training exchange (the plain one unless a wrapper changes it)."""
        return exchange.train(contents)

    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        """The aggregated values of the keys that travelled."""
        raise NotImplementedError

    def server_update(self, previous: State, aggregated: State) -> State:
        """The next global values of ``aggregated``'s keys, given the global state before the round
        (e.g. FedAvgM's server momentum). Default: the aggregate itself."""
        return aggregated

    def round_metrics(self, server_round: int, sample_rate: float) -> dict[str, float]:
        """Values the aggregator adds to the round's metrics row (e.g. central DP's ε)."""
        return {}

    def state_dict(self) -> State:
        """What the aggregator carries across rounds (saved in checkpoints, for ``--resume``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` from a checkpoint."""
        if state:
            raise FederationError(
                f"{type(self).__name__} keeps no server state, but the checkpoint holds {sorted(state)[:3]}"
            )

    def require_updates(self, replies: RoundReplies) -> list[ClientUpdate]:
        """The individual updates; refuses a round whose updates only arrived as a sum."""
        if replies.mean_delta is not None:
            raise FederationError(f"{type(self).__name__} needs each client's update, but only their sum arrived")
        if not replies.updates:
            raise ValueError("cannot aggregate zero client updates")
        return replies.updates


class AggregatorWrapper(Aggregator):
    """An aggregator that adds to another one: every call goes to ``inner`` unless overridden.

    Args:
        inner: The wrapped aggregator (a strategy or another wrapper).
    """

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner

    @property  # type: ignore[misc]
    def linear(self) -> bool:  # type: ignore[override]
        return self.inner.linear

    def configure_round(self, server_round: int) -> dict[str, Any]:
        return self.inner.configure_round(server_round)

    def collect(self, exchange: Exchange, contents: Mapping[int, Any], server_round: int) -> RoundReplies:
        return self.inner.collect(exchange, contents, server_round)

    def aggregate(self, replies: RoundReplies, global_state: Mapping[str, torch.Tensor]) -> State:
        return self.inner.aggregate(replies, global_state)

    def server_update(self, previous: State, aggregated: State) -> State:
        return self.inner.server_update(previous, aggregated)

    def round_metrics(self, server_round: int, sample_rate: float) -> dict[str, float]:
        return self.inner.round_metrics(server_round, sample_rate)

    def state_dict(self) -> State:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)


__all__ = ["Aggregator", "AggregatorWrapper", "ClientUpdate", "Exchange", "RoundReplies", "State"]
