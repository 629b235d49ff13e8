"""Which clients train in a round: a seeded draw that server and clients can both repeat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_clients(partition_ids: Sequence[int], clients_per_round: int, seed: int, server_round: int) -> list[int]:
    """The clients of a round: all when ``clients_per_round`` is 0, else a seeded sample.

    The draw depends only on ``(seed, round)``, so an interrupted and resumed run samples exactly
    as an uninterrupted one.

    Example:
        >>> sample_clients([0, 1, 2, 3], 0, seed=1, server_round=5)
        [0, 1, 2, 3]
        >>> len(sample_clients([0, 1, 2, 3], 2, seed=1, server_round=5))
        2
    """
    ordered = sorted(partition_ids)
    if clients_per_round <= 0 or clients_per_round >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(ordered, size=clients_per_round, replace=False))


def planned_rounds(partition_id: int, num_clients: int, clients_per_round: int, seed: int, rounds: int) -> int:
    """Rounds of ``1..rounds`` that sample ``partition_id`` (of clients ``0..num_clients−1``).

    A client computes it from the run config alone, so its DP-SGD noise can be set for its whole
    run (``privacy.target_epsilon``) without asking the server.

    Example:
        >>> planned_rounds(3, num_clients=10, clients_per_round=0, seed=0, rounds=7)
        7
        >>> sum(planned_rounds(p, 10, 2, seed=0, rounds=30) for p in range(10))  # 2 a round
        60
    """
    clients = list(range(num_clients))
    return sum(partition_id in sample_clients(clients, clients_per_round, seed, r) for r in range(1, rounds + 1))


__all__ = ["planned_rounds", "sample_clients"]
