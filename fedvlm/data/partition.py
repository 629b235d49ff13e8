"""Spread a data pool over clients with a named partitioner (:func:`partition`).

Everything works on plain arrays (labels, patient groups, sites), not on records, so every task
shares it; the held-out test set is :func:`fedvlm.data.split.split_train_test`'s. All samples of
one group (a patient) land on the same client, and label skew works at group level.

Every partitioner has the same interface, so a recipe can name any of them::

    partitioner(labels, num_clients, rng, *, groups=None, sites=None, **options) -> list[np.ndarray]

where ``options`` are the fields of the options dataclass it registered (``data.partition:
{name: dirichlet, alpha: 0.3}``). It returns, per client, a sorted array of sample indices;
together the arrays cover every index exactly once.

Example:
    >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> patients = np.array(["p0", "p0", "p1", "p2", "p3", "p3", "p4", "p5"])
    >>> shards = partition("iid", labels, num_clients=2, seed=0, groups=patients)
    >>> sorted(len(shard) for shard in shards)
    [4, 4]
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedvlm.data.split import Groups, as_labels, as_names, group_samples
from fedvlm.errors import ConfigError, DataError
from fedvlm.registry import Registry

#: How many Dirichlet draws :func:`partition_dirichlet` tries before giving up on ``min_size``.
MAX_DIRICHLET_DRAWS = 1000

partitioners: Registry[list[np.ndarray]] = Registry("partitioner")


def _shards(groups: Groups, client_of_group: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Per client, the sorted indices of the samples whose group it was given."""
    client_of_sample = client_of_group[groups.sample_group]
    return [np.flatnonzero(client_of_sample == client) for client in range(num_clients)]


def _fill_in_order(group_order: np.ndarray, group_size: np.ndarray, client_target: np.ndarray) -> np.ndarray:
    """Client of each group in ``group_order`` when the groups are laid end to end and cut at
    the cumulative client targets.

    A group goes to the client whose stretch holds the group's midpoint, so each client gets
    within half a group of its target at either end; single-sample groups meet integer targets
    exactly.
    """
    ordered_size = group_size[group_order]
    midpoints = np.cumsum(ordered_size) - ordered_size / 2
    cuts = np.cumsum(client_target)[:-1]
    return np.searchsorted(cuts, midpoints, side="right")


@partitioners.register("iid")
def partition_iid(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
) -> list[np.ndarray]:
    """IID split: shuffled groups dealt out so client sizes differ by at most one group.

    Each group, in shuffled order, goes to the client with the fewest samples so far (the
    lowest index on ties), so no two clients differ by more than the largest group's size, and
    by at most one sample on ungrouped data.

    Raises:
        DataError: If there are fewer groups than clients.
    """
    table = group_samples(as_labels(labels), groups)
    num_groups = len(table.size)
    if num_groups < num_clients:
        raise DataError(f"iid partition: {num_groups} group(s) (patients) cannot fill {num_clients} clients")
    client_of_group = np.empty(num_groups, dtype=np.int64)
    size_and_client = [(0, client) for client in range(num_clients)]
    for group in rng.permutation(num_groups):
        client_size, client = heapq.heappop(size_and_client)
        client_of_group[group] = client
        heapq.heappush(size_and_client, (client_size + int(table.size[group]), client))
    return _shards(table, client_of_group, num_clients)


@dataclass
class DirichletOptions:
    """``alpha``: the Dirichlet concentration (smaller: more label skew); ``min_size``: the fewest
    samples a client may get (the draw is repeated until every client has them)."""

    alpha: float = 0.5
    min_size: int = 0


@partitioners.register("dirichlet", options=DirichletOptions)
def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
    alpha: float = 0.5,
    min_size: int = 0,
) -> list[np.ndarray]:
    """Label skew by Dirichlet proportions (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification").

    In the per-class form that has become the standard benchmark: for each label class ``c``,
    client proportions ``p_c ~ Dir(alpha · 1_K)`` are drawn and the class's shuffled groups
    are cut at ``p_c`` times its sample count. Smaller ``alpha`` gives more skew; large
    ``alpha`` approaches IID. The whole draw is repeated, up to :data:`MAX_DIRICHLET_DRAWS`
    times, until every client has at least ``max(min_size, 1)`` samples.

    Raises:
        ConfigError: If ``alpha <= 0``, ``min_size < 0`` or ``num_clients`` clients of
            ``min_size`` samples exceed the data.
        DataError: If no draw gives every client ``min_size`` samples.
    """
    label_array = as_labels(labels)
    if not alpha > 0:
        raise ConfigError(f"dirichlet partition: alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ConfigError(f"dirichlet partition: min_size must be >= 0, got {min_size}")
    required_size = max(min_size, 1)
    if num_clients * required_size > len(label_array):
        raise ConfigError(
            f"dirichlet partition: {num_clients} clients of at least {required_size} samples "
            f"need {num_clients * required_size} samples, but there are {len(label_array)}"
        )
    table = group_samples(label_array, groups)
    concentration = np.full(num_clients, alpha)
    best_smallest_client = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        client_of_group = np.empty(len(table.size), dtype=np.int64)
        for label in np.unique(table.label):
            class_groups = rng.permutation(np.flatnonzero(table.label == label))
            client_target = rng.dirichlet(concentration) * table.size[class_groups].sum()
            client_of_group[class_groups] = _fill_in_order(class_groups, table.size, client_target)
        client_size = np.bincount(client_of_group, weights=table.size, minlength=num_clients)
        if client_size.min() >= required_size:
            return _shards(table, client_of_group, num_clients)
        best_smallest_client = max(best_smallest_client, int(client_size.min()))
    raise DataError(
        f"dirichlet partition: none of {MAX_DIRICHLET_DRAWS} draws with alpha={alpha} gave all "
        f"{num_clients} clients at least {required_size} samples (the best draw's smallest "
        f"client had {best_smallest_client}); raise alpha, lower min_size or use fewer clients"
    )


def _draw_client_sizes(
    num_samples: int, num_clients: int, min_size: int, max_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Client sizes in ``[min_size, max_size]`` summing to ``num_samples``.

    Each size starts as a uniform draw from the range; the surplus or shortfall against
    ``num_samples`` is then taken from or added to clients at random within their room (a
    multivariate hypergeometric draw), so every size stays in range.
    """
    client_size = rng.integers(min_size, max_size, size=num_clients, endpoint=True)
    shortfall = num_samples - int(client_size.sum())
    if shortfall > 0:
        client_size += rng.multivariate_hypergeometric(max_size - client_size, shortfall)
    elif shortfall < 0:
        client_size -= rng.multivariate_hypergeometric(client_size - min_size, -shortfall)
    return client_size


@dataclass
class QuantityOptions:
    """Client sizes are drawn uniformly in ``[min_size, max_size]``."""

    min_size: int = 0
    max_size: int = 0


@partitioners.register("quantity", options=QuantityOptions)
def partition_quantity(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
    min_size: int = 0,
    max_size: int = 0,
) -> list[np.ndarray]:
    """Quantity skew: client sizes drawn in ``[min_size, max_size]``, labels IID within.

    Sizes are drawn uniformly in the range and adjusted to sum to the number of samples
    (see :func:`_draw_client_sizes`); shuffled groups then fill the clients in turn. On
    ungrouped data every size is exactly in range; with groups a client can miss its drawn
    size, and so the range, by up to half a group at either end.

    Raises:
        ConfigError: Unless ``1 <= min_size <= max_size`` and
            ``num_clients * min_size <= n <= num_clients * max_size``.
        DataError: If groups are so large that a client receives none.
    """
    label_array = as_labels(labels)
    num_samples = len(label_array)
    if not 1 <= min_size <= max_size:
        raise ConfigError(
            f"quantity partition needs 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}"
        )
    if not num_clients * min_size <= num_samples <= num_clients * max_size:
        raise ConfigError(
            f"quantity partition: {num_clients} clients of {min_size}..{max_size} samples hold "
            f"{num_clients * min_size}..{num_clients * max_size} samples, but there are "
            f"{num_samples}"
        )
    client_size = _draw_client_sizes(num_samples, num_clients, min_size, max_size, rng)
    table = group_samples(label_array, groups)
    group_order = rng.permutation(len(table.size))
    client_of_group = np.empty(len(table.size), dtype=np.int64)
    client_of_group[group_order] = _fill_in_order(group_order, table.size, client_size)
    shards = _shards(table, client_of_group, num_clients)
    empty_clients = [client for client, shard in enumerate(shards) if shard.size == 0]
    if empty_clients:
        raise DataError(
            f"quantity partition: client(s) {empty_clients} received no group (patient); the "
            f"largest group has {int(table.size.max())} samples against min_size={min_size}"
        )
    return shards


@dataclass
class SiteOptions:
    """``fallback``: the partitioner (a name or ``{name, options}``) used when the data carry no
    site (e.g. MIMIC-CXR); null makes site-less data an error. Applied by the caller
    (:func:`fedvlm.tasks.site.partition_spec`)."""

    fallback: Any = None


@partitioners.register("site", options=SiteOptions)
def partition_site(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
    fallback: Any = None,
) -> list[np.ndarray]:
    """One client per acquisition site, clients ordered by sorted site name.

    Raises:
        ConfigError: If ``sites`` is not given or ``num_clients`` differs from the number of
            distinct sites.
        DataError: If a site is missing (None/NaN) or a group (patient) spans several sites.
    """
    label_array = as_labels(labels)
    if sites is None:
        raise ConfigError("site partition needs `sites`, one site name per sample")
    site_names, client_of_sample = np.unique(as_names(sites, "sites", len(label_array)), return_inverse=True)
    if len(site_names) != num_clients:
        raise ConfigError(
            f"site partition: num_clients={num_clients}, but the data has {len(site_names)} "
            f"site(s): {', '.join(site_names)}"
        )
    if groups is not None:
        table = group_samples(label_array, groups)
        group_site_pairs = np.unique(np.stack([table.sample_group, client_of_sample]), axis=1)
        sites_per_group = np.bincount(group_site_pairs[0], minlength=len(table.size))
        if sites_per_group.max() > 1:
            group = int(np.argmax(sites_per_group > 1))
            group_sites = site_names[group_site_pairs[1][group_site_pairs[0] == group]]
            patient = str(table.name[group])
            raise DataError(
                f"site partition: group (patient) {patient!r} has samples at several "
                f"sites ({', '.join(group_sites)}); a patient must stay on one client"
            )
    return [np.flatnonzero(client_of_sample == client) for client in range(num_clients)]


@partitioners.register("single")
def partition_single(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    groups: np.ndarray | None = None,
    sites: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Everything to one client: the centralized baseline.

    Raises:
        ConfigError: If ``num_clients`` is not 1.
    """
    label_array = as_labels(labels)
    if num_clients != 1:
        raise ConfigError(f"single partition (centralized baseline) needs num_clients=1, got {num_clients}")
    return [np.arange(len(label_array))]


def _check_exact_cover(name: str, shards: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    """Raise if ``shards`` are not ``num_clients`` sorted arrays covering each index once."""
    if len(shards) != num_clients:
        raise RuntimeError(f"partitioner {name!r} returned {len(shards)} shards for {num_clients} clients")
    for client, shard in enumerate(shards):
        if shard.ndim != 1 or np.any(np.diff(shard) <= 0):
            raise RuntimeError(
                f"partitioner {name!r}: client {client}'s indices are not a sorted 1-D array without repeats"
            )
    all_indices = np.concatenate(shards)
    if len(all_indices) != num_samples or not np.array_equal(np.sort(all_indices), np.arange(num_samples)):
        raise RuntimeError(
            f"partitioner {name!r} did not cover each of the {num_samples} samples exactly "
            f"once ({len(all_indices)} indices, {len(np.unique(all_indices))} distinct)"
        )


def partition(
    name: str,
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    seed: int,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    sites: Sequence[Any] | np.ndarray | None = None,
    **options: Any,
) -> list[np.ndarray]:
    """Split samples over clients with the partitioner registered under ``name``.

    Args:
        name: A name in :data:`partitioners` (``iid``, ``dirichlet``, ``quantity``, ``site``,
            ``single``).
        labels: Integer label of each sample.
        num_clients: Number of clients, at least 1.
        seed: Seed of ``np.random.default_rng``; the same seed gives the same partition.
        groups: Per sample, its group (patient); a group stays on one client.
        sites: Per sample, its acquisition site (``site`` partitioner).
        **options: The partitioner's options (``alpha``, ``min_size`` ...), checked against the
            dataclass it declared (the options of ``data.partition``); one it does not take raises.
            ``max_size``.

    Returns:
        Per client, the sorted indices of its samples; together they cover every index once.

    Raises:
        ConfigError: If ``name`` is unknown (listing the valid names), ``num_clients < 1``, or
            the partitioner rejects its parameters.
        DataError: If the data cannot be partitioned as asked.
        RuntimeError: If the partitioner broke the exact-cover invariant (a bug).

    Example:
        >>> shards = partition("quantity", np.zeros(10, dtype=int), 3, seed=0,
        ...                    min_size=2, max_size=5)
        >>> sum(len(shard) for shard in shards), all(2 <= len(s) <= 5 for s in shards)
        (10, True)
    """
    spec = partitioners.spec({"name": name, **options}, "data.partition")  # unknown name or option: ConfigError
    partitioner = partitioners.get(name)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"num_clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    label_array = as_labels(labels)
    given = {k: v for k, v in spec.items() if k != "name"}
    shards = partitioner(
        label_array, int(num_clients), np.random.default_rng(seed), groups=groups, sites=sites, **given
    )
    _check_exact_cover(name, shards, len(label_array), int(num_clients))
    return shards


def summarize_partition(
    partitions: list[np.ndarray], labels: np.ndarray, label_names: Mapping[int, str]
) -> list[dict[str, Any]]:
    """Per-client sample and label counts, as written to ``partition.json``.

    Args:
        partitions: Per client, the indices of its samples.
        labels: Integer label of each sample.
        label_names: Display name of every label; every name appears in each client's
            ``by_label`` (zero counts included), in label order.

    Returns:
        Per client ``{"client": k, "num_samples": n, "by_label": {name: count, ...}}``.

    Raises:
        DataError: If a label has no name in ``label_names``.

    Example:
        >>> summarize_partition([np.array([0, 1])], np.array([1, 1]), {0: "healthy", 1: "ALL"})
        [{'client': 0, 'num_samples': 2, 'by_label': {'healthy': 0, 'ALL': 2}}]
    """
    label_array = as_labels(labels)
    unnamed = sorted(set(np.unique(label_array).tolist()) - set(label_names))
    if unnamed:
        raise DataError(f"labels {unnamed} have no name in label_names (named: {sorted(label_names)})")
    summary = []
    for client, shard in enumerate(partitions):
        client_labels = label_array[shard]
        by_label = {label_names[label]: int(np.count_nonzero(client_labels == label)) for label in sorted(label_names)}
        summary.append({"client": client, "num_samples": len(shard), "by_label": by_label})
    return summary


def label_skew(partitions: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the global.

    ``TV(p_k, p) = ½ Σ_c |p_k(c) − p(c)|``, averaged over clients: 0 for a perfectly IID
    split, approaching 1 when clients hold disjoint rare classes.

    Raises:
        DataError: If there are no clients or a client is empty.

    Example:
        >>> labels = np.array([0, 0, 1, 1])
        >>> label_skew([np.array([0, 2]), np.array([1, 3])], labels)
        0.0
        >>> label_skew([np.array([0, 1]), np.array([2, 3])], labels)
        0.5
    """
    label_array = as_labels(labels)
    if not partitions:
        raise DataError("label_skew needs at least one client")
    _, label_code = np.unique(label_array, return_inverse=True)
    num_classes = int(label_code.max()) + 1
    global_share = np.bincount(label_code, minlength=num_classes) / len(label_code)
    distances = []
    for client, shard in enumerate(partitions):
        if len(shard) == 0:
            raise DataError(f"label_skew: client {client} has no samples")
        client_share = np.bincount(label_code[shard], minlength=num_classes) / len(shard)
        distances.append(0.5 * float(np.abs(client_share - global_share).sum()))
    return float(np.mean(distances))
