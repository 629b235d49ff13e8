"""The held-out test set of one data pool, and the patient groups both it and the partitioners keep whole.

All samples of one group (a patient) land on the same side of the split (and, in
:mod:`fedvlm.data.partition`, on the same client). Stratification works at group level, a group's
label being the most frequent label of its samples (ties go to the smallest label).

Example:
    >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> patients = np.array(["p0", "p0", "p1", "p2", "p3", "p3", "p4", "p5"])
    >>> train, test = split_train_test(labels, patients, test_fraction=0.25, seed=0)
    >>> len(test), set(patients[train]) & set(patients[test])
    (2, set())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedvlm.errors import ConfigError, DataError


@dataclass(frozen=True)
class Groups:
    """Samples gathered into groups (patients).

    Attributes:
        sample_group: ``(n,)`` index into the group arrays of each sample's group.
        label: ``(G,)`` each group's most frequent sample label.
        size: ``(G,)`` number of samples in each group.
        name: ``(G,)`` group names, sorted.
    """

    sample_group: np.ndarray
    label: np.ndarray
    size: np.ndarray
    name: np.ndarray


def as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels as a non-empty 1-D integer array.

    Raises:
        DataError: If the labels are empty, not 1-D or not integers.
    """
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {label_array.shape}")
    if label_array.size == 0:
        raise DataError("labels are empty: there are no samples to split")
    if label_array.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got dtype {label_array.dtype}")
    return label_array


def is_missing(value: object) -> bool:
    # NaN is how pandas spells an empty CSV cell.
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_names(values: Sequence[Any] | np.ndarray, what: str, num_samples: int) -> np.ndarray:
    """Per-sample names (patients, sites) as a 1-D ``str`` array.

    Raises:
        DataError: If there is not one value per sample or a value is missing.
    """
    value_array = np.asarray(values, dtype=object)
    if value_array.ndim != 1 or len(value_array) != num_samples:
        raise DataError(
            f"{what} must hold one value per sample: got shape {value_array.shape} for {num_samples} labels"
        )
    missing = [index for index, value in enumerate(value_array) if is_missing(value)]
    if missing:
        raise DataError(f"{what} is missing (None/NaN) for {len(missing)} sample(s), first at index {missing[0]}")
    return value_array.astype(str)


def group_samples(labels: np.ndarray, groups: Sequence[Any] | np.ndarray | None) -> Groups:
    """Gather samples into groups; ``groups=None`` makes every sample its own group."""
    num_samples = len(labels)
    if groups is None:
        group_names = np.arange(num_samples).astype(str)
        sample_group = np.arange(num_samples)
    else:
        group_names, sample_group = np.unique(as_names(groups, "groups", num_samples), return_inverse=True)
    label_values, sample_label = np.unique(labels, return_inverse=True)
    label_counts = np.zeros((len(group_names), len(label_values)), dtype=np.int64)
    np.add.at(label_counts, (sample_group, sample_label), 1)
    return Groups(
        sample_group=sample_group,
        label=label_values[label_counts.argmax(axis=1)],
        size=label_counts.sum(axis=1),
        name=group_names,
    )


def _choose_test_groups(stratum_size: np.ndarray, test_fraction: float) -> np.ndarray:
    """Which groups of one (shuffled) stratum go to the test set.

    Walks the groups in order and takes one whenever that brings the test count closer to
    ``test_fraction`` of the stratum, which ends within half the largest group of the target.
    A stratum of two or more groups always keeps at least one group on each side.
    """
    target = test_fraction * stratum_size.sum()
    chosen = np.zeros(len(stratum_size), dtype=bool)
    taken = 0
    for position, size in enumerate(stratum_size.tolist()):
        if taken >= target:
            break
        if abs(taken + size - target) < abs(taken - target):
            chosen[position] = True
            taken += size
    if len(stratum_size) >= 2:
        smallest = int(np.argmin(stratum_size))
        if not chosen.any():
            chosen[smallest] = True
        elif chosen.all():
            chosen[smallest] = False
    return chosen


def split_train_test(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a stratified, group-aware global test set.

    Groups (patients) are stratified by their label (the most frequent label of their
    samples). Within each stratum the groups are shuffled and taken into the test set while
    that brings the stratum's test count closer to ``test_fraction`` of its samples, so each
    stratum's test count ends within half its largest group of the target. A stratum with at
    least two groups always has a group on each side; a stratum with a single group goes
    wherever the rule above puts it (to train when ``test_fraction < 0.5``).

    Args:
        labels: Integer label of each sample.
        groups: Group (patient) of each sample; a group never lands on both sides.
        test_fraction: Share of samples to hold out, in ``(0, 1)``.
        seed: Seed of the shuffle; the same seed gives the same split.

    Returns:
        Sorted sample indices ``(train, test)``.

    Raises:
        ConfigError: If ``test_fraction`` is not in ``(0, 1)``.
        DataError: If labels are empty or not integers, ``groups`` does not hold one
            non-missing value per sample, or one side would be empty (every label has a
            single group).

    Example:
        >>> labels = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
        >>> patients = [f"p{index}" for index in range(10)]
        >>> train, test = split_train_test(labels, patients, test_fraction=0.5, seed=0)
        >>> len(train), len(test), int(np.sum(np.asarray(labels)[test]))
        (5, 5, 2)
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    label_array = as_labels(labels)
    table = group_samples(label_array, groups)
    rng = np.random.default_rng(seed)
    group_in_test = np.zeros(len(table.size), dtype=bool)
    for label in np.unique(table.label):
        stratum = rng.permutation(np.flatnonzero(table.label == label))
        group_in_test[stratum] = _choose_test_groups(table.size[stratum], test_fraction)
    sample_in_test = group_in_test[table.sample_group]
    train, test = np.flatnonzero(~sample_in_test), np.flatnonzero(sample_in_test)
    if train.size == 0 or test.size == 0:
        empty_side = "test" if test.size == 0 else "train"
        raise DataError(
            f"split_train_test: the {empty_side} set would be empty with "
            f"test_fraction={test_fraction}: every label has a single group (patient) among "
            f"{len(table.size)} group(s)"
        )
    return train, test
