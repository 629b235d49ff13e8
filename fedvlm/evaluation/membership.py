"""Membership inference, measured without moving a record: attack scores and mergeable ROC counts.

A membership-inference attack scores each record; the higher the score, the surer the attacker
is that the record was trained on. How well it separates members (records the clients trained
on) from non-members (records from the same distribution nobody trained on) is the ROC of those
scores. Under fedvlm's rule that nothing per-sample leaves a site, each site scores its own
records and keeps the scores: what it sends is :class:`MembershipROC`'s state, a binned
member / non-member count per threshold (torchmetrics' ``BinaryROC`` with fixed thresholds), which
the server sums (:func:`fedvlm.evaluation.metrics.merge_states`) into the pooled ROC — the same
curve as if it had seen every score, up to the bin width.

Scores, all in ``[0, 1]`` so that one threshold grid serves each attack:

* :func:`loss_score` — the loss (or confidence) threshold attack of Yeom et al. 2018: members
  have lower loss. The score falls with ``log10(loss)``, so low losses keep their resolution.
* :func:`lira_offline_score` — offline LiRA (Carlini et al. 2022, Eq. 4 one-sided): fit a
  Gaussian to the record's logit-scaled confidence ``φ = log(p / (1 − p))`` under reference
  models that did not train on it, and score ``Φ((φ − μ_out) / σ_out)``.

Reported (:meth:`MembershipROC.report`, the keys of ``RUN_DIR/attack/mia.json``): ``auc``,
``advantage`` = ``max(TPR − FPR)`` (Yeom's membership advantage), ``tpr_at_1pct_fpr`` and
``tpr_at_0.1pct_fpr`` (the highest TPR among thresholds whose FPR is at most that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.classification import BinaryROC

MIA_BINS = 2001
"""Thresholds of the mergeable ROC (``[bins, 2, 2]`` counts): a score step of 1/2000."""

LOSS_DECADES = (-10.0, 4.0)
"""``log10`` range of the losses :func:`loss_score` tells apart (outside it, clipped)."""


def loss_score(loss: torch.Tensor) -> torch.Tensor:
    """Yeom et al.'s attack score of per-record losses: ``1`` at loss ``1e-10``, ``0`` at ``1e4``,
    linear in ``log10(loss)`` between (a member has a lower loss, hence a higher score).

    Example:
        >>> [round(s, 4) for s in loss_score(torch.tensor([1e-10, 1e-3, 1.0, 1e4])).tolist()]
        [1.0, 0.5, 0.2857, 0.0]
    """
    low, high = LOSS_DECADES
    decades = torch.log10(loss.double().clamp(min=10**low, max=10**high))
    return ((high - decades) / (high - low)).float()


def logit_confidence(probability: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """LiRA's ``φ = log(p) − log(1 − p)`` of the probability ``p`` a model gives the true label,
    close to Gaussian across models (Carlini et al. 2022, §4.2); ``p`` clamped to ``[eps, 1 − eps]``."""
    p = probability.double().clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def lira_offline_score(target: torch.Tensor, references: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """Offline LiRA: ``Φ((φ − μ_out) / σ_out)`` per record.

    Args:
        target: ``[n]`` φ of each record under the attacked model.
        references: ``[k, n]`` φ of the same records under ``k`` reference models that did not
            train on them (trained on disjoint data with the same recipe).
        min_std: Floor of ``σ_out`` (a record every reference model scores alike).

    Returns:
        ``[n]`` scores in ``[0, 1]``: how far above the non-member distribution the record sits.

    Example:
        >>> score = lira_offline_score(torch.tensor([2.0]), torch.tensor([[0.0], [1.0], [2.0]]))
        >>> round(float(score), 4)  # μ = 1, σ = sqrt(2/3): Φ(1.2247)
        0.8897
    """
    if references.dim() != 2 or references.shape[1] != target.shape[0]:
        raise ValueError(f"references must be [k, {target.shape[0]}], got {list(references.shape)}")
    if references.shape[0] < 2:
        raise ValueError(f"offline LiRA needs at least 2 reference models to fit a Gaussian, got {references.shape[0]}")
    mean = references.double().mean(dim=0)
    std = references.double().std(dim=0, unbiased=False).clamp(min=min_std)  # Carlini et al.'s np.std
    z = (target.double() - mean) / std
    return (0.5 * (1 + torch.erf(z / math.sqrt(2)))).float()


class MembershipROC(torch.nn.Module):
    """Member vs non-member ROC of attack scores, as counts a site can send.

    Args:
        bins: Thresholds, evenly spaced on ``[0, 1]`` (scores must lie there).

    Example:
        >>> roc = MembershipROC(bins=11)  # thresholds 0, 0.1, …, 1
        >>> roc.update(torch.tensor([0.95, 0.85, 0.45]), torch.tensor([1, 1, 1]))
        >>> roc.update(torch.tensor([0.35, 0.25, 0.88]), torch.tensor([0, 0, 0]))
        >>> {k: round(v, 4) for k, v in roc.report().items()}  # 0.85 and 0.88 share a bin: a tie, ½
        {'auc': 0.8333, 'advantage': 0.6667, 'tpr_at_1pct_fpr': 0.3333, 'tpr_at_0.1pct_fpr': 0.3333}
    """

    def __init__(self, bins: int = MIA_BINS) -> None:
        super().__init__()
        self.roc = BinaryROC(thresholds=bins)

    def update(self, scores: torch.Tensor, is_member: torch.Tensor) -> None:
        """Add records' scores (in ``[0, 1]``) with their membership (1: trained on)."""
        if scores.numel() and (float(scores.min()) < 0 or float(scores.max()) > 1):
            raise ValueError(f"attack scores must lie in [0, 1], got [{float(scores.min())}, {float(scores.max())}]")
        self.roc.update(scores.float(), is_member.long())

    def curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(FPR, TPR)`` at every threshold, FPR increasing."""
        members, non_members = self.counts()
        if members == 0 or non_members == 0:
            raise ValueError(f"the ROC needs members and non-members, got {members} and {non_members}")
        fpr, tpr, _ = self.roc.compute()
        return fpr.double(), tpr.double()

    def counts(self) -> tuple[int, int]:
        """Members and non-members scored (the first threshold, 0, counts every record)."""
        confmat = self.roc.confmat[0]  # [[TN, FP], [FN, TP]] at threshold 0
        return int(confmat[1].sum()), int(confmat[0].sum())

    def report(self) -> dict[str, float]:
        """``auc``, ``advantage``, ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``."""
        fpr, tpr = self.curve()
        return {
            "auc": float(torch.trapezoid(tpr, fpr)),
            "advantage": float((tpr - fpr).max()),
            "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        }


def tpr_at_fpr(fpr: Sequence[float] | torch.Tensor, tpr: Sequence[float] | torch.Tensor, target: float) -> float:
    """The highest TPR among the ROC's points whose FPR is at most ``target`` (0 when none is)."""
    fpr_t, tpr_t = torch.as_tensor(fpr, dtype=torch.float64), torch.as_tensor(tpr, dtype=torch.float64)
    allowed = fpr_t <= target + 1e-12
    return float(tpr_t[allowed].max()) if bool(allowed.any()) else 0.0


__all__ = [
    "LOSS_DECADES",
    "MIA_BINS",
    "MembershipROC",
    "lira_offline_score",
    "logit_confidence",
    "loss_score",
    "tpr_at_fpr",
]
