"""Aggregation strategies, registered by name (``federation.strategy: fedprox``).

A strategy says what it adds to each client's round config and how decoded client states
become the next global state. FedAvg's weighted mean is Flower's own
``aggregate_arrayrecords``; FedProx wraps FedAvg and adds μ to the client config, because the
proximal term is applied on the client (:class:`~fedvlm.federation.callback.FederatedRoundCallback`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedvlm.federation import keys
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


class FedAvg:
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


strategies: Registry[Strategy] = Registry("strategy")


@strategies.register("fedavg")
def make_fedavg(federation: Mapping[str, Any]) -> Strategy:
    """FedAvg weighted by client size."""
    return FedAvg()


@strategies.register("fedprox")
def make_fedprox(federation: Mapping[str, Any]) -> Strategy:
    """FedProx with ``federation.proximal_mu``."""
    return FedProx(float(federation["proximal_mu"]))
