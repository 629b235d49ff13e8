"""Byzantine-robust aggregation rules over client states: trimmed mean, median, Krum, Multi-Krum.

The server aggregates *states* (the clients' trained weights), not deltas. The coordinate-wise
rules act on each weight independently, and Krum's distances between two states equal the
distances between their deltas (the global weights cancel), so both work on states directly.

All rules here are **unweighted**: a Byzantine client can report any ``num-examples``, so
weighting by it would hand the attacker the aggregate. Values are computed in float64 and cast
back to each entry's dtype, like FedAvg does (integer buffers are averaged, then truncated).

References:
    Yin, Chen, Ramchandran & Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates" (coordinate-wise median and trimmed mean).
    Blanchard, El Mhamdi, Guerraoui & Stainer 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent" (Krum, Multi-Krum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

State = dict[str, torch.Tensor]


def _stacked(states: Sequence[State], key: str) -> torch.Tensor:
    """``[n, *shape]`` float64 stack of one entry over the clients."""
    return torch.stack([state[key].detach().cpu().to(torch.float64) for state in states])


def _check(states: Sequence[State]) -> None:
    if not states:
        raise ValueError("cannot aggregate zero client updates")


def trimmed_mean(states: Sequence[State], trim_fraction: float) -> State:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018, Definition 2).

    For each coordinate, the ``⌊β·n⌋`` largest and ``⌊β·n⌋`` smallest of the ``n`` client values
    are dropped and the rest averaged; Flower's ``trim_mean`` (as in ``FedTrimmedAvg``) does the
    trimming. ``β = 0`` is the plain mean; with ``⌊β·n⌋ = 0`` nothing is trimmed.

    Args:
        states: The client states (same keys and shapes).
        trim_fraction: β in ``[0, 0.5)``, the fraction trimmed on *each* side.

    Returns:
        The aggregated state, each entry in its original dtype.

    Raises:
        ValueError: If ``states`` is empty or ``trim_fraction`` is outside ``[0, 0.5)``.

    Example:
        >>> states = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
        >>> trimmed_mean(states, 0.2)["w"]  # drops 1 and 100
        tensor([3.])
    """
    _check(states)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction {trim_fraction} must be in [0, 0.5)")
    reference = states[0]
    return {
        key: torch.from_numpy(np.asarray(trim_mean(_stacked(states, key).numpy(), trim_fraction))).to(value.dtype)
        for key, value in reference.items()
    }


def coordinate_median(states: Sequence[State]) -> State:
    """Coordinate-wise median (Yin et al. 2018, Definition 1), as Flower's ``FedMedian``.

    With an even number of clients the two middle values are averaged (``numpy.median``'s
    convention; ``torch.median`` would return the lower one).

    Example:
        >>> states = [{"w": torch.tensor([v, -v])} for v in (1.0, 5.0, 2.0, 100.0)]
        >>> coordinate_median(states)["w"]
        tensor([ 3.5000, -3.5000])
    """
    _check(states)
    aggregated: State = {}
    count = len(states)
    for key, value in states[0].items():
        ordered = _stacked(states, key).sort(dim=0).values
        middle = ordered[count // 2] if count % 2 else (ordered[count // 2 - 1] + ordered[count // 2]) / 2
        aggregated[key] = middle.to(value.dtype)
    return aggregated


def pairwise_sq_distances(states: Sequence[State]) -> torch.Tensor:
    """``[n, n]`` squared L2 distances between the clients' floating-point entries (float64).

    Computed key by key with exact differences (not ``‖x‖² + ‖y‖² − 2x·y``, which cancels
    catastrophically for nearby weight vectors of large norm), so memory stays at one entry's
    stack. Integer buffers (counters) are left out.
    """
    _check(states)
    count = len(states)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for key, value in states[0].items():
        if not value.is_floating_point():
            continue
        flat = _stacked(states, key).reshape(count, -1)
        distances += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    return distances


def krum_scores(states: Sequence[State], byzantine_f: int) -> torch.Tensor:
    """Krum scores (Blanchard et al. 2017, Sec. 4): ``s(i) = Σ_{i→j} ‖V_i − V_j‖²``.

    ``i → j`` ranges over the ``n − f − 2`` updates closest to ``V_i`` (itself excluded).

    Args:
        states: The ``n`` client states.
        byzantine_f: ``f``, the assumed number of Byzantine clients.

    Returns:
        ``[n]`` float64 scores; lower is more central.

    Raises:
        ValueError: Unless ``n > 2f + 2`` (the condition of Krum's resilience proposition).
    """
    count = len(states)
    if count <= 2 * byzantine_f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 updates: n={count}, f={byzantine_f}")
    distances = pairwise_sq_distances(states)
    distances.fill_diagonal_(float("inf"))
    closest = distances.sort(dim=1).values[:, : count - byzantine_f - 2]
    return closest.sum(dim=1)


def multikrum_select(states: Sequence[State], byzantine_f: int, num_selected: int) -> list[int]:
    """Indices of the ``m`` lowest Krum scores, best first (Multi-Krum; ``m = 1`` is Krum).

    Ties go to the lower index, so the choice is deterministic in partition order.

    Example:
        >>> honest = [{"w": torch.tensor([v, 0.0])} for v in (0.0, 1.0, 2.0, 4.0)]
        >>> multikrum_select([*honest, {"w": torch.tensor([50.0, -50.0])}], byzantine_f=1, num_selected=1)
        [1]
    """
    if not 1 <= num_selected <= len(states):
        raise ValueError(f"cannot select {num_selected} of {len(states)} updates")
    scores = krum_scores(states, byzantine_f)
    return [int(i) for i in torch.argsort(scores, stable=True)[:num_selected]]


def multikrum(states: Sequence[State], byzantine_f: int, num_selected: int) -> State:
    """Multi-Krum: the plain mean of the ``m`` selected states (Blanchard et al. 2017, Sec. 5).

    ``m = 1`` returns Krum's choice itself.
    """
    chosen = multikrum_select(states, byzantine_f, num_selected)
    return trimmed_mean([states[i] for i in chosen], 0.0)
