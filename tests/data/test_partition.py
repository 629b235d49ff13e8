"""Tests of the train/test split, the partitioner registry and the partition summaries."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import fedvlm.data.partition as partition_module
from fedvlm.data.partition import MAX_DIRICHLET_DRAWS, label_skew, partition, partitioners, summarize_partition
from fedvlm.data.split import split_train_test
from fedvlm.errors import ConfigError, DataError
from fedvlm.registry import Registry

NUM_SITES = 4
# Partitioners that need a particular client count; every other one is run with NUM_SITES.
NUM_CLIENTS_FOR = {"single": 1}
# Partitioners whose result does not depend on the seed.
SEED_INDEPENDENT = {"site", "single"}


def _grouped_pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """~150 samples of 60 patients (1-4 samples each, a few with mixed labels) at 4 sites."""
    rng = np.random.default_rng(7)
    samples_per_patient = rng.integers(1, 5, size=60)
    patient_of_sample = np.repeat(np.arange(60), samples_per_patient)
    patient_label = rng.integers(0, 3, size=60)
    labels = patient_label[patient_of_sample]
    mixed = rng.random(len(labels)) < 0.1
    labels[mixed] = rng.integers(0, 3, size=int(mixed.sum()))
    patients = np.array([f"patient-{patient:02d}" for patient in patient_of_sample])
    sites = np.array([f"site-{patient % NUM_SITES}" for patient in patient_of_sample])
    return labels, patients, sites


LABELS, PATIENTS, SITES = _grouped_pool()


POOL_OPTIONS = {"alpha": 1.0, "min_size": 10, "max_size": 80}


def _partition_pool(name: str, seed: int) -> list[np.ndarray]:
    declared = partitioners.options_of(name)
    fields = {f.name for f in dataclasses.fields(declared)} if declared else set()
    options = {k: v for k, v in POOL_OPTIONS.items() if k in fields}  # each partitioner takes only its own
    return partition(name, LABELS, NUM_CLIENTS_FOR.get(name, NUM_SITES), seed, groups=PATIENTS, sites=SITES, **options)


def test_a_partitioner_refuses_an_option_it_does_not_take() -> None:
    with pytest.raises(
        ConfigError, match=r"data.partition.alpha: not an option of partitioner 'iid' \(options: none\)"
    ):
        partition("iid", LABELS, 3, seed=0, alpha=1.0)


def _sizes(shards: list[np.ndarray]) -> list[int]:
    return [len(shard) for shard in shards]


# --- invariants shared by every registered partitioner ---------------------------------------


@pytest.mark.parametrize("name", partitioners.names())
def test_partitioner_covers_every_index_once_in_sorted_shards(name: str) -> None:
    shards = _partition_pool(name, seed=0)
    assert len(shards) == NUM_CLIENTS_FOR.get(name, NUM_SITES)
    for shard in shards:
        assert shard.dtype.kind == "i" and len(shard) > 0
        assert np.all(np.diff(shard) > 0)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(LABELS)))


@pytest.mark.parametrize("name", partitioners.names())
def test_partitioner_keeps_each_patient_on_one_client(name: str) -> None:
    shards = _partition_pool(name, seed=0)
    patients_per_client = [set(PATIENTS[shard]) for shard in shards]
    for client, patients in enumerate(patients_per_client):
        for other in patients_per_client[client + 1 :]:
            assert not patients & other


@pytest.mark.parametrize("name", partitioners.names())
def test_partitioner_is_deterministic_for_a_seed(name: str) -> None:
    first, second = _partition_pool(name, seed=3), _partition_pool(name, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("name", sorted(set(partitioners.names()) - SEED_INDEPENDENT))
def test_partitioner_changes_with_the_seed(name: str) -> None:
    first, second = _partition_pool(name, seed=3), _partition_pool(name, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


# --- individual partitioners -----------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one_on_ungrouped_data() -> None:
    labels = np.arange(103) % 3
    sizes = _sizes(partition("iid", labels, num_clients=7, seed=0))
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_iid_sizes_differ_by_at_most_the_largest_patient() -> None:
    largest_patient = max(np.unique(PATIENTS, return_counts=True)[1])
    sizes = _sizes(partition("iid", LABELS, num_clients=5, seed=0, groups=PATIENTS))
    assert max(sizes) - min(sizes) <= largest_patient


def test_iid_rejects_fewer_patients_than_clients() -> None:
    with pytest.raises(DataError, match=r"2 group\(s\) \(patients\) cannot fill 3 clients"):
        partition("iid", [0, 1, 0], num_clients=3, seed=0, groups=["a", "a", "b"])


def test_dirichlet_small_alpha_skews_labels_large_alpha_is_near_iid() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=5000)
    skewed = partition("dirichlet", labels, num_clients=5, seed=0, alpha=0.1)
    near_iid = partition("dirichlet", labels, num_clients=5, seed=0, alpha=100.0)
    assert label_skew(near_iid, labels) < 0.1
    assert label_skew(skewed, labels) > 0.3 > label_skew(near_iid, labels)


def test_dirichlet_gives_every_client_min_size() -> None:
    labels = np.arange(200) % 2
    for seed in range(5):
        shards = partition("dirichlet", labels, 4, seed=seed, alpha=0.3, min_size=20)
        assert min(_sizes(shards)) >= 20


def test_dirichlet_gives_every_client_a_sample_by_default() -> None:
    labels = np.arange(12) % 3
    for seed in range(5):
        assert min(_sizes(partition("dirichlet", labels, 4, seed=seed, alpha=0.1))) >= 1


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_rejects_non_positive_alpha(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        partition("dirichlet", [0, 1, 0, 1], num_clients=2, seed=0, alpha=alpha)


def test_dirichlet_rejects_negative_min_size() -> None:
    with pytest.raises(ConfigError, match="min_size must be >= 0, got -1"):
        partition("dirichlet", [0, 1, 0, 1], num_clients=2, seed=0, min_size=-1)


def test_dirichlet_rejects_min_size_beyond_the_data() -> None:
    with pytest.raises(ConfigError, match="need 12 samples, but there are 10"):
        partition("dirichlet", np.arange(10) % 2, num_clients=4, seed=0, min_size=3)


def test_dirichlet_gives_up_after_bounded_draws() -> None:
    with pytest.raises(DataError, match=f"none of {MAX_DIRICHLET_DRAWS} draws with alpha=0.01"):
        partition("dirichlet", np.arange(10) % 2, num_clients=5, seed=0, alpha=0.01, min_size=2)


def test_quantity_sizes_are_in_range_and_sum_to_n() -> None:
    labels = np.arange(2500) % 2
    for seed in range(10):
        sizes = _sizes(partition("quantity", labels, 5, seed=seed, min_size=400, max_size=600))
        assert sum(sizes) == 2500 and all(400 <= size <= 600 for size in sizes)


def test_quantity_spreads_sizes_when_the_range_allows() -> None:
    labels = np.arange(2500) % 2
    sizes = _sizes(partition("quantity", labels, 5, seed=0, min_size=100, max_size=900))
    assert max(sizes) - min(sizes) > 50


def test_quantity_keeps_labels_iid_within_clients() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=5000)
    shards = partition("quantity", labels, 5, seed=0, min_size=500, max_size=1500)
    assert label_skew(shards, labels) < 0.1


@pytest.mark.parametrize(
    ("min_size", "max_size", "message"),
    [
        (3, 5, r"5 clients of 3\.\.5 samples hold 15\.\.25 samples, but there are 10"),
        (1, 1, r"5 clients of 1\.\.1 samples hold 5\.\.5 samples, but there are 10"),
        (0, 5, "needs 1 <= min_size <= max_size, got min_size=0, max_size=5"),
        (4, 3, "needs 1 <= min_size <= max_size, got min_size=4, max_size=3"),
    ],
)
def test_quantity_rejects_infeasible_ranges(min_size: int, max_size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition("quantity", np.zeros(10, dtype=int), 5, seed=0, min_size=min_size, max_size=max_size)


def test_quantity_rejects_patients_too_large_to_fill_every_client() -> None:
    with pytest.raises(DataError, match=r"received no group \(patient\).*largest group has 5"):
        partition(
            "quantity",
            np.zeros(10, dtype=int),
            num_clients=3,
            seed=0,
            groups=["a"] * 5 + ["b"] * 5,
            min_size=1,
            max_size=8,
        )


def test_site_gives_exactly_the_site_membership() -> None:
    shards = partition("site", LABELS, NUM_SITES, seed=0, groups=PATIENTS, sites=SITES)
    for client, site in enumerate(sorted(set(SITES))):
        assert np.array_equal(shards[client], np.flatnonzero(site == SITES))


def test_site_requires_sites() -> None:
    with pytest.raises(ConfigError, match="site partition needs `sites`"):
        partition("site", [0, 1], num_clients=1, seed=0)


def test_site_rejects_a_client_count_other_than_the_site_count() -> None:
    with pytest.raises(ConfigError, match=r"num_clients=3, but the data has 2 site.*: lab-a, lab-b"):
        partition("site", [0, 1, 0], num_clients=3, seed=0, sites=["lab-b", "lab-a", "lab-b"])


@pytest.mark.parametrize("missing_site", [None, float("nan")])
def test_site_rejects_a_missing_site(missing_site: object) -> None:
    with pytest.raises(DataError, match=r"sites is missing \(None/NaN\) for 1 sample.*index 1"):
        partition("site", [0, 1, 0], num_clients=1, seed=0, sites=["a", missing_site, "a"])


def test_site_rejects_a_patient_at_two_sites() -> None:
    with pytest.raises(DataError, match=r"patient\) 'p1' has samples at several sites \(a, b\)"):
        partition(
            "site",
            [0, 1, 0],
            num_clients=2,
            seed=0,
            groups=["p0", "p1", "p1"],
            sites=["a", "a", "b"],
        )


def test_single_gives_everything_to_one_client() -> None:
    (shard,) = partition("single", [0, 1, 1, 0], num_clients=1, seed=0)
    assert shard.tolist() == [0, 1, 2, 3]


def test_single_rejects_more_than_one_client() -> None:
    with pytest.raises(ConfigError, match="needs num_clients=1, got 2"):
        partition("single", [0, 1], num_clients=2, seed=0)


# --- partition() -----------------------------------------------------------------------------


def test_partition_rejects_an_unknown_name_listing_the_valid_ones() -> None:
    valid = ", ".join(partitioners.names())
    with pytest.raises(ConfigError, match=f"unknown partitioner 'dirichelt'; valid names: {valid}"):
        partition("dirichelt", [0, 1], num_clients=1, seed=0)


@pytest.mark.parametrize(
    ("num_clients", "message"),
    [(0, "num_clients must be >= 1, got 0"), (2.5, "must be an integer, got 2.5")],
)
def test_partition_rejects_bad_client_counts(num_clients: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition("iid", [0, 1], num_clients=num_clients, seed=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([], "labels are empty"),
        ([0.0, 1.0], "labels must be integers, got dtype float64"),
        ([[0, 1]], r"labels must be a 1-D array, got shape \(1, 2\)"),
    ],
)
def test_partition_rejects_bad_labels(labels: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition("iid", labels, num_clients=1, seed=0)


def test_partition_rejects_groups_of_the_wrong_length() -> None:
    with pytest.raises(DataError, match=r"groups must hold one value per sample: got shape \(2,\)"):
        partition("iid", [0, 1, 0], num_clients=1, seed=0, groups=["a", "b"])


@pytest.mark.parametrize(
    ("broken_shards", "message"),
    [
        ([np.array([0, 1])], "returned 1 shards for 2 clients"),
        ([np.array([1, 0]), np.array([2])], "client 0's indices are not a sorted 1-D array"),
        ([np.array([0, 1]), np.array([1])], "did not cover each of the 3 samples exactly once"),
    ],
)
def test_partition_catches_a_partitioner_breaking_the_cover_invariant(
    monkeypatch: pytest.MonkeyPatch, broken_shards: list[np.ndarray], message: str
) -> None:
    broken_registry: Registry[list[np.ndarray]] = Registry("partitioner")
    broken_registry.register("broken")(lambda *args, **kwargs: broken_shards)
    monkeypatch.setattr(partition_module, "partitioners", broken_registry)
    with pytest.raises(RuntimeError, match=f"partitioner 'broken'.*{message}|{message}"):
        partition("broken", [0, 1, 0], num_clients=2, seed=0)


# --- split_train_test ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test_fraction", "test_per_label"),
    # Targets per label (6 zeros, 4 ones): 0.3 → 1.8, 1.2 → 2, 1; 0.5 → 3, 2; 0.7 → 4.2, 2.8 → 4, 3.
    [(0.3, (2, 1)), (0.5, (3, 2)), (0.7, (4, 3))],
)
def test_split_hand_computed_test_counts_on_ungrouped_samples(
    test_fraction: float, test_per_label: tuple[int, int]
) -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    patients = [f"p{index}" for index in range(10)]
    for seed in range(5):
        train, test = split_train_test(labels, patients, test_fraction, seed)
        assert tuple(np.bincount(labels[test], minlength=2)) == test_per_label
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(10))


def test_split_hand_computed_test_counts_on_patients_of_two_samples() -> None:
    # 5 patients per label, 2 samples each: a 0.4 target of 4 samples = 2 patients per label.
    labels = np.repeat([0, 1], 10)
    patients = np.repeat([f"p{index}" for index in range(10)], 2)
    train, test = split_train_test(labels, patients, test_fraction=0.4, seed=0)
    assert len(test) == 8 and tuple(np.bincount(labels[test])) == (4, 4)
    assert not set(patients[train]) & set(patients[test])


def test_split_stratifies_patients_by_their_most_frequent_label() -> None:
    # Mixed patients start with a 1 but are mostly 0, so they form their own stratum.
    labels = [1, 0, 0] * 2 + [1, 1] * 2
    patients = ["mixed-a"] * 3 + ["mixed-b"] * 3 + ["pure-a"] * 2 + ["pure-b"] * 2
    for seed in range(10):
        _, test = split_train_test(labels, patients, test_fraction=0.5, seed=seed)
        test_patients = {patients[index] for index in test}
        assert sum(patient.startswith("mixed") for patient in test_patients) == 1
        assert sum(patient.startswith("pure") for patient in test_patients) == 1


def test_split_keeps_patients_on_one_side_and_fractions_per_label() -> None:
    largest_patient = max(np.unique(PATIENTS, return_counts=True)[1])
    train, test = split_train_test(LABELS, PATIENTS, test_fraction=0.25, seed=0)
    assert not set(PATIENTS[train]) & set(PATIENTS[test])
    for label in np.unique(LABELS):
        label_count = np.count_nonzero(label == LABELS)
        test_count = np.count_nonzero(LABELS[test] == label)
        # A patient's stray minority samples can move a label's count by a few samples too.
        assert abs(test_count - 0.25 * label_count) <= largest_patient + 3


def test_split_rounds_each_label_to_the_nearest_count_on_ungrouped_samples() -> None:
    # Single-sample patients: every label's test count is its nearest-integer target, which is
    # what a stratified split (sklearn's train_test_split(stratify=...)) gives up to ±1.
    labels = np.random.default_rng(1).choice(4, size=997, p=[0.5, 0.3, 0.15, 0.05])
    _, test = split_train_test(labels, np.arange(997).astype(str), test_fraction=0.2, seed=0)
    expected = [round(0.2 * count) for count in np.bincount(labels)]
    assert np.bincount(labels[test]).tolist() == expected


def test_split_puts_a_two_patient_label_on_both_sides() -> None:
    labels = [0] * 20 + [1, 1]
    patients = [f"p{index}" for index in range(22)]
    train, test = split_train_test(labels, patients, test_fraction=0.1, seed=0)
    assert 1 in np.asarray(labels)[test] and 1 in np.asarray(labels)[train]


def test_split_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    first = split_train_test(LABELS, PATIENTS, test_fraction=0.2, seed=5)
    second = split_train_test(LABELS, PATIENTS, test_fraction=0.2, seed=5)
    other = split_train_test(LABELS, PATIENTS, test_fraction=0.2, seed=6)
    assert np.array_equal(first[1], second[1]) and not np.array_equal(first[1], other[1])


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, 1.5, float("nan")])
def test_split_rejects_a_fraction_outside_0_1(test_fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction must be in \\(0, 1\\)"):
        split_train_test([0, 1], ["a", "b"], test_fraction, seed=0)


def test_split_rejects_groups_of_the_wrong_length() -> None:
    with pytest.raises(DataError, match=r"groups must hold one value per sample.*for 3 labels"):
        split_train_test([0, 1, 0], ["a", "b"], test_fraction=0.5, seed=0)


def test_split_rejects_a_missing_patient() -> None:
    with pytest.raises(DataError, match=r"groups is missing \(None/NaN\).*index 0"):
        patients_with_a_gap: list[Any] = [None, "b"]
        split_train_test([0, 1], patients_with_a_gap, test_fraction=0.5, seed=0)


def test_split_rejects_data_where_one_side_would_be_empty() -> None:
    with pytest.raises(DataError, match=r"test set would be empty.*single group"):
        split_train_test([0, 0, 1], ["a", "a", "b"], test_fraction=0.2, seed=0)


# --- summaries -------------------------------------------------------------------------------


def test_summarize_partition_counts_every_label_including_zeros() -> None:
    labels = np.array([0, 1, 1, 2, 0])
    summary = summarize_partition([np.array([0, 4]), np.array([1, 2, 3])], labels, {0: "healthy", 1: "ALL", 2: "AML"})
    assert summary == [
        {"client": 0, "num_samples": 2, "by_label": {"healthy": 2, "ALL": 0, "AML": 0}},
        {"client": 1, "num_samples": 3, "by_label": {"healthy": 0, "ALL": 2, "AML": 1}},
    ]


def test_summarize_partition_rejects_an_unnamed_label() -> None:
    with pytest.raises(DataError, match=r"labels \[2\] have no name in label_names"):
        summarize_partition([np.array([0, 1])], np.array([0, 2]), {0: "healthy", 1: "ALL"})


def test_label_skew_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    assert label_skew([np.array([0, 2]), np.array([1, 3])], labels) == 0.0
    # Global (½, ½); client shares (1, 0) and (0, 1): TV = ½ each.
    assert label_skew([np.array([0, 1]), np.array([2, 3])], labels) == 0.5
    # Global (¾, ¼); client shares (1, 0) → ¼ and (½, ½) → ¼.
    assert label_skew([np.array([0, 1]), np.array([2, 3])], np.array([0, 0, 0, 1])) == 0.25


def test_label_skew_rejects_an_empty_client() -> None:
    with pytest.raises(DataError, match="client 1 has no samples"):
        label_skew([np.array([0, 1]), np.array([], dtype=int)], np.array([0, 1]))


def test_label_skew_rejects_no_clients() -> None:
    with pytest.raises(DataError, match="at least one client"):
        label_skew([], np.array([0, 1]))
