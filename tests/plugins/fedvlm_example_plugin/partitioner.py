"""Patients dealt to clients in turn, in order of first appearance, starting at client ``offset``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedvlm.data.partition import partitioners


@dataclass
class RoundRobinOptions:
    offset: int = 0


@partitioners.register("round_robin", options=RoundRobinOptions)
def partition_round_robin(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
    offset: int = 0,
) -> list[np.ndarray]:
    keys = np.arange(len(labels)) if groups is None else np.asarray(groups, dtype=object)
    _, first, group_of = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # rank of each group by its first sample
    client_of = (order[group_of] + offset) % num_clients
    return [np.flatnonzero(client_of == client) for client in range(num_clients)]
