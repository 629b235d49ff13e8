"""FedAvg with a server learning rate: ``w ← w + η·(Σ_k n_k w_k / n − w)``."""

from __future__ import annotations

from dataclasses import dataclass

from fedvlm.federation.aggregation import State
from fedvlm.federation.strategies import FedAvg, strategies


@dataclass
class ServerStepOptions:
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.server_lr <= 1.0:
            raise ValueError(f"server_lr={self.server_lr} must be in (0, 1]")


@strategies.register("server_step", options=ServerStepOptions)
class ServerStep(FedAvg):
    linear = True  # the aggregate is still FedAvg's weighted mean: runs under SecAgg+ and central DP

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def server_update(self, previous: State, aggregated: State) -> State:
        return {
            key: previous[key] + self.server_lr * (value - previous[key]) if value.is_floating_point() else value
            for key, value in aggregated.items()
        }

    def round_metrics(self, server_round: int, sample_rate: float) -> dict[str, float]:
        return {"server_step/lr": self.server_lr}
