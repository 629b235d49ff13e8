"""Membership inference: the mergeable ROC against sklearn, LiRA's Gaussian test by hand, and
both attacks on a model that memorised its members and on one that never saw them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fedvlm.evaluation.membership import (
    MembershipROC,
    lira_offline_score,
    logit_confidence,
    loss_score,
    tpr_at_fpr,
)
from fedvlm.evaluation.metrics import export_state, merge_states


def _scores(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    members = rng.beta(3, 2, n)  # members score higher on average
    non_members = rng.beta(2, 3, n)
    return torch.tensor(np.concatenate([members, non_members])), torch.tensor([1] * n + [0] * n)


def test_the_binned_roc_matches_sklearn_within_a_bin() -> None:
    scores, labels = _scores(1500, seed=0)
    roc = MembershipROC()
    roc.update(scores, labels)
    report = roc.report()
    assert report["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=2e-3)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert report["advantage"] == pytest.approx(float(np.max(tpr - fpr)), abs=5e-3)
    for target, key in ((0.01, "tpr_at_1pct_fpr"), (0.001, "tpr_at_0.1pct_fpr")):
        exact = tpr_at_fpr(fpr, tpr, target)
        assert report[key] <= exact + 1e-9 and report[key] == pytest.approx(exact, abs=0.02)
    assert roc.counts() == (1500, 1500)


def test_sites_merge_their_counts_into_the_pooled_roc() -> None:
    scores, labels = _scores(600, seed=1)
    pooled = MembershipROC()
    pooled.update(scores, labels)
    sites = []
    for part in (slice(0, 500), slice(500, 1200)):  # two sites, each scoring its own records
        site = MembershipROC()
        site.update(scores[part], labels[part])
        sites.append(export_state(site))  # counts only: every exported value is a whole number
        assert all(float(v).is_integer() for values in sites[-1].values() for v in values)
    server = MembershipROC()
    merge_states(server, sites)
    assert server.report() == pooled.report()


def test_scores_outside_the_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        MembershipROC().update(torch.tensor([0.5, 1.5]), torch.tensor([1, 0]))
    roc = MembershipROC()
    roc.update(torch.tensor([0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="needs members and non-members, got 1 and 0"):
        roc.report()


def test_lira_is_the_gaussian_tail_of_the_reference_models() -> None:
    target = torch.tensor([2.0, -1.0, 0.5])
    references = torch.tensor([[0.0, -1.0, 0.4], [1.0, 0.0, 0.6], [2.0, 1.0, 0.5], [1.0, -2.0, 0.5]])
    mean, std = references.numpy().mean(axis=0), references.numpy().std(axis=0)
    expected = norm.cdf((target.numpy() - mean) / std)
    assert lira_offline_score(target, references).numpy() == pytest.approx(expected, abs=1e-6)
    p = torch.tensor([0.5, 0.9, 1e-3])
    assert logit_confidence(p).numpy() == pytest.approx(np.log(p.numpy() / (1 - p.numpy())), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 reference models"):
        lira_offline_score(target, references[:1])


# -- the attacks on trained models ---------------------------------------------------------


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _memorise(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """An MLP trained to near-zero loss on random labels of 10 classes: it can only memorise them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _losses_and_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x)
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return losses, logit_confidence(logits.softmax(-1).gather(1, y[:, None]).squeeze(1))


def _auc(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    roc = MembershipROC()
    roc.update(scores, is_member)
    return roc.report()["auc"]


def test_both_attacks_find_the_members_of_a_memorising_model_and_not_of_an_unrelated_one() -> None:
    members, non_members = _data(64, seed=0), _data(64, seed=1)
    x = torch.cat([members[0], non_members[0]])
    y = torch.cat([members[1], non_members[1]])
    is_member = torch.tensor([1] * 64 + [0] * 64)
    target = _memorise(*members, seed=0)
    unrelated = _memorise(*_data(64, seed=2), seed=0)  # never saw a member
    references = [_memorise(*_data(64, seed=10 + k), seed=k) for k in range(4)]  # disjoint data (OUT models)
    reference_phi = torch.stack([_losses_and_confidence(m, x, y)[1] for m in references])

    for model, high in ((target, True), (unrelated, False)):
        losses, phi = _losses_and_confidence(model, x, y)
        loss_auc = _auc(loss_score(losses), is_member)
        lira_auc = _auc(lira_offline_score(phi, reference_phi), is_member)
        if high:
            assert loss_auc >= 0.9 and lira_auc >= 0.9
        else:  # at chance: 64 + 64 records put the 95% band of a chance AUC at about ±0.1
            assert abs(loss_auc - 0.5) < 0.13 and abs(lira_auc - 0.5) < 0.13
