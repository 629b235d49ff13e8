import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from fedvlm.evaluation.metrics import export_state, merge_states
from fedvlm.tasks.leukemia.metrics import LeukemiaMetrics


def client_data(seed: int, positive_rate: float, n: int = 80) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    leukemia = (torch.rand(n, generator=g) < positive_rate).long()
    prob = (0.35 * leukemia + 0.65 * torch.rand(n, generator=g)).clamp(0, 1)
    stage = torch.where(leukemia == 1, torch.randint(0, 4, (n,), generator=g), torch.full((n,), -1))
    noisy = torch.where(torch.rand(n, generator=g) < 0.7, stage.clamp_min(0), torch.randint(0, 4, (n,), generator=g))
    stage_prob = torch.nn.functional.one_hot(noisy, 4).float() * 0.7 + 0.075
    return prob, leukemia, stage_prob, stage


SITES = [client_data(0, 0.2), client_data(1, 0.5), client_data(2, 0.8)]


def test_merged_state_equals_pooled_data_and_differs_from_mean_of_aucs() -> None:
    states, per_site_auroc = [], []
    pooled_direct = LeukemiaMetrics(4)
    for site in SITES:
        local = LeukemiaMetrics(4)
        local.update(*site)
        states.append(export_state(local))
        per_site_auroc.append(local.compute_scalars()["auroc"])
        pooled_direct.update(*site)
    merged = LeukemiaMetrics(4)
    merge_states(merged, states)
    assert merged.compute_scalars() == pytest.approx(pooled_direct.compute_scalars())
    prob = torch.cat([s[0] for s in SITES])
    label = torch.cat([s[1] for s in SITES])
    exact = roc_auc_score(label.numpy(), prob.numpy())
    assert merged.compute_scalars()["auroc"] == pytest.approx(exact, abs=5e-3)  # 200 bins
    mean_of_sites = sum(per_site_auroc) / len(per_site_auroc)
    assert abs(mean_of_sites - exact) > 5e-3  # averaging numbers is not pooling


def test_stage_macro_f1_matches_sklearn_on_staged_positives() -> None:
    metrics = LeukemiaMetrics(4, auroc_bins=None)
    for site in SITES:
        metrics.update(*site)
    stage = torch.cat([s[3] for s in SITES])
    predicted = torch.cat([s[2] for s in SITES]).argmax(-1)
    staged = stage >= 0
    expected = f1_score(stage[staged].numpy(), predicted[staged].numpy(), average="macro")
    assert metrics.compute_scalars()["stage_macro_f1"] == pytest.approx(expected, abs=1e-6)
    matrix = metrics.compute()["stage_confusion_matrix"]
    assert int(matrix.sum()) == int(staged.sum())


def test_exact_auroc_state_cannot_leave_a_client() -> None:
    metrics = LeukemiaMetrics(4, auroc_bins=None)
    metrics.update(*SITES[0])
    with pytest.raises(ValueError, match="'detection.auroc' state 'preds' is not sum-reduced counts"):
        export_state(metrics)


def test_exported_state_holds_counts_not_samples() -> None:
    metrics = LeukemiaMetrics(4)
    metrics.update(*SITES[0])
    state = export_state(metrics)
    sizes = {len(v) for v in state.values()}
    assert max(sizes) == 200 * 2 * 2  # the binned ROC counts, whatever the sample count
    metrics_big = LeukemiaMetrics(4)
    metrics_big.update(*client_data(5, 0.5, n=500))
    assert {k: len(v) for k, v in export_state(metrics_big).items()} == {k: len(v) for k, v in state.items()}


def test_empty_staging_reports_zero_instead_of_nan() -> None:
    metrics = LeukemiaMetrics(4)
    metrics.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), torch.full((2, 4), 0.25), torch.tensor([-1, -1]))
    assert metrics.compute_scalars()["stage_macro_f1"] == 0.0


def test_merged_metrics_compute_quietly_and_see_merged_stages(recwarn: pytest.WarningsRecorder) -> None:
    """The server's metrics hold only merged states (torchmetrics' merge_state counts no update):
    staging still sees the merged staged samples, and compute does not warn about update."""
    only_negatives = client_data(3, 0.0)
    sites = [only_negatives, SITES[1]]
    merged, direct = LeukemiaMetrics(4), LeukemiaMetrics(4)
    for site in sites:
        local = LeukemiaMetrics(4)
        local.update(*site)
        merge_states(merged, [export_state(local)])
        direct.update(*site)
    scalars = merged.compute_scalars()
    assert scalars["stage_macro_f1"] > 0 and scalars == pytest.approx(direct.compute_scalars())
    assert not [w for w in recwarn if "before the ``update``" in str(w.message)]
