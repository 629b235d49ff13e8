"""CXR metrics against sklearn and brute force; pooled client states equal one central pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedvlm.evaluation.metrics import export_state, merge_states
from fedvlm.tasks.cxr.metrics import CxrMetrics, linear_probe_auroc, retrieval_recall

LABELS = ("a", "b", "c")


def scores_and_labels(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(n, 3)).astype(np.float32)
    labels[rng.random((n, 3)) < 0.15] = np.nan
    scores = np.clip(np.nan_to_num(labels, nan=0.5) * 0.4 + rng.random((n, 3)) * 0.6, 0, 1)
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)


def test_exact_auroc_per_label_matches_sklearn_ignoring_unknown_labels() -> None:
    scores, labels = scores_and_labels()
    metrics = CxrMetrics(LABELS, auroc_bins=None)
    metrics.update(scores[:120], labels[:120])
    metrics.update(scores[120:], labels[120:])
    values = metrics.compute_scalars()
    expected = []
    for column, name in enumerate(LABELS):
        known = ~torch.isnan(labels[:, column])
        reference = roc_auc_score(labels[known, column].numpy(), scores[known, column].numpy())
        expected.append(reference)
        assert values[f"auroc/{name}"] == pytest.approx(reference, abs=1e-6)
    assert values["macro_auroc"] == pytest.approx(np.mean(expected), abs=1e-6)


def test_label_without_positives_is_left_out_of_the_macro_average() -> None:
    scores, labels = scores_and_labels()
    labels[:, 2] = 0.0
    metrics = CxrMetrics(LABELS, auroc_bins=None)
    metrics.update(scores, labels)
    values = metrics.compute_scalars()
    assert np.isnan(values["auroc/c"])
    assert values["macro_auroc"] == pytest.approx((values["auroc/a"] + values["auroc/b"]) / 2)


def test_merged_client_states_equal_one_pass_over_the_pooled_data() -> None:
    scores, labels = scores_and_labels(300, seed=1)
    pooled_directly = CxrMetrics(LABELS)
    pooled_directly.update(scores, labels)
    states = []
    for rows in (slice(0, 50), slice(50, 200), slice(200, 300)):
        client = CxrMetrics(LABELS)
        client.update(scores[rows], labels[rows])
        states.append(export_state(client))
    merged = CxrMetrics(LABELS)
    merge_states(merged, states)
    assert merged.compute_scalars() == pytest.approx(pooled_directly.compute_scalars())
    # and the pooled value is not the mean of the clients' values
    exact = CxrMetrics(LABELS, auroc_bins=None)
    exact.update(scores, labels)
    assert merged.compute_scalars()["macro_auroc"] == pytest.approx(exact.compute_scalars()["macro_auroc"], abs=0.01)


def test_mergeable_metrics_keep_no_embeddings() -> None:
    metrics = CxrMetrics(LABELS, keep_embeddings=False)
    metrics.update(*scores_and_labels(10), torch.eye(10), torch.eye(10), torch.arange(10))
    assert not any("recall" in key for key in metrics.compute_scalars())
    assert all("." in key for key in export_state(metrics))  # counts only


def test_retrieval_recall_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(40, 8, generator=generator), dim=-1)
    groups = torch.arange(40)
    groups[5] = groups[6] = 5  # two identical reports
    recall = retrieval_recall(images, texts, groups, [1, 5])
    similarity = (images @ texts.T).numpy()
    for k in (1, 5):
        hits = 0
        for query in range(40):
            top = np.argsort(-similarity[query])[:k]
            hits += any(groups[j] == groups[query] for j in top)
        assert recall[k] == pytest.approx(hits / 40)


def test_retrieval_metrics_are_computed_when_embeddings_are_kept() -> None:
    embeddings = torch.eye(4)
    metrics = CxrMetrics(LABELS, auroc_bins=None, retrieval_k=(1,), keep_embeddings=True)
    scores, labels = scores_and_labels(4)
    metrics.update(scores, labels, embeddings, embeddings[[0, 1, 3, 2]], torch.arange(4))
    values = metrics.compute_scalars()
    assert values["i2t_recall@1"] == 0.5 and values["t2i_recall@1"] == 0.5


def test_linear_probe_separates_a_linearly_separable_label() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 5)).astype(np.float32)
    labels = np.stack([(features[:, 0] > 0), rng.random(400) < 0.5], axis=1).astype(np.float32)
    result = linear_probe_auroc(features[:300], labels[:300], features[300:], labels[300:], shots=16, seed=0)
    assert result[0] > 0.9  # the informative label
    assert 0.3 < result[1] < 0.7  # the noise label stays near chance
    assert linear_probe_auroc(features[:300], labels[:300], features[300:], labels[300:], shots=16, seed=0) == result
    assert linear_probe_auroc(features[:3], labels[:3], features[300:], labels[300:], shots=16, seed=0) == {}


@pytest.mark.parametrize("bins", [None, 200])
def test_a_label_with_no_valid_sample_is_nan_and_left_out_of_the_macro(bins: int | None) -> None:
    nan = float("nan")
    probabilities = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.7, 0.4, 0.5], [0.3, 0.6, 0.5]])
    labels = torch.tensor([[1.0, 0.0, nan], [0.0, 1.0, nan], [0.0, nan, nan], [1.0, 1.0, nan]])
    metrics = CxrMetrics(["a", "b", "c"], auroc_bins=bins)
    metrics.update(probabilities, labels)
    scalars = metrics.compute_scalars()  # exact torchmetrics would raise IndexError on label c
    expected_a = roc_auc_score([1, 0, 0, 1], [0.9, 0.1, 0.7, 0.3])
    expected_b = roc_auc_score([0, 1, 1], [0.2, 0.8, 0.6])
    assert math.isnan(scalars["auroc/c"])
    assert scalars["auroc/a"] == pytest.approx(expected_a, abs=0.01)
    assert scalars["macro_auroc"] == pytest.approx((expected_a + expected_b) / 2, abs=0.01)
