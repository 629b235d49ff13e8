"""Chest X-ray evaluation: zero-shot multi-label AUROC/F1/accuracy, retrieval Recall@K, few-shot probes.

:class:`CxrMetrics` follows the leukemia metrics' rule — **merge state, don't average numbers**:
its zero-shot metrics are torchmetrics with sum-reduced state (binned AUROC, stat scores) when
``mergeable``, so clients send counts and the server computes pooled values. Retrieval needs
the embeddings of a whole gallery, which never leave a site: each site retrieves within its own
split and sends hit and query counts (:meth:`CxrMetrics.export_counts`), so the merged Recall@K
is the share of all sites' queries answered within their own site's gallery.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAccuracy, MultilabelAUROC, MultilabelF1Score

from fedvlm.evaluation.metrics import AUROC_BINS, merged_metrics_compute

IGNORE = -1
"""Target value torchmetrics skips: unknown labels (``nan``) are mapped to it."""


def to_targets(labels: torch.Tensor) -> torch.Tensor:
    """Float labels with ``nan`` unknown → integer targets with :data:`IGNORE` for unknown."""
    return torch.where(torch.isnan(labels), torch.full_like(labels, IGNORE), labels).long()


def retrieval_recall(
    queries: torch.Tensor, gallery: torch.Tensor, groups: torch.Tensor, ks: Sequence[int]
) -> dict[int, float]:
    """Recall@K of cross-modal retrieval: query ``i``'s match is gallery item ``i``.

    A hit counts when any of the top-K gallery items belongs to the query's group — the same
    report text (templated reports repeat: retrieving an identical report is correct).

    Args:
        queries: ``[N, P]`` normalised embeddings (images for image→text).
        gallery: ``[N, P]`` normalised embeddings of the other modality, row-aligned with queries.
        groups: ``[N]`` group id per row (identical reports share one).
        ks: The K values.

    Example:
        >>> e = torch.eye(3)
        >>> retrieval_recall(e, e[[1, 0, 2]], torch.arange(3), [1, 2])
        {1: 0.3333333333333333, 2: 1.0}
    """
    similarity = queries @ gallery.T
    order = similarity.argsort(dim=1, descending=True)
    hits = groups[order] == groups.unsqueeze(1)  # [N, N]: rank r holds a correct item
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(groups, hits.shape[1]))
    return {k: float((first_hit < k).double().mean()) for k in ks}


class CxrMetrics(torch.nn.Module):
    """Zero-shot classification metrics (+ retrieval where the gallery is local).

    Args:
        label_names: The labels, in label-vector order.
        auroc_bins: Thresholds of the binned (mergeable) AUROC; ``None`` for the exact AUROC.
        retrieval_k: K values of Recall@K; retrieval is computed only when ``keep_embeddings``.
        keep_embeddings: Keep the embeddings of every update for retrieval (never on a client).

    Example:
        >>> metrics = CxrMetrics(["a", "b"], auroc_bins=None, keep_embeddings=False)
        >>> metrics.update(torch.tensor([[0.9, 0.2], [0.1, 0.8], [0.7, 0.4]]),
        ...                torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, float("nan")]]))
        >>> {k: round(v, 3) for k, v in metrics.compute_scalars().items()}["macro_auroc"]
        1.0
    """

    def __init__(
        self,
        label_names: Sequence[str],
        auroc_bins: int | None = AUROC_BINS,
        retrieval_k: Sequence[int] = (1, 5, 10),
        keep_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.label_names = tuple(label_names)
        num_labels = len(self.label_names)
        self.zero_shot = MetricCollection(
            {
                "auroc": MultilabelAUROC(num_labels, average=None, thresholds=auroc_bins, ignore_index=IGNORE),
                "f1": MultilabelF1Score(num_labels, average=None, ignore_index=IGNORE),
                "accuracy": MultilabelAccuracy(num_labels, average=None, ignore_index=IGNORE),
            }
        )
        self.retrieval_k = tuple(retrieval_k)
        self.keep_embeddings = keep_embeddings
        self._embeddings: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._retrieval_counts: dict[str, float] = {}

    def update(
        self,
        probabilities: torch.Tensor,
        labels: torch.Tensor,
        image_embeddings: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: zero-shot ``P(label)`` ``[B, C]``, labels ``[B, C]`` (``nan`` unknown) and,
        for retrieval, the batch's normalised embeddings and report group ids."""
        self.zero_shot.update(probabilities.float(), to_targets(labels))
        if self.keep_embeddings and image_embeddings is not None and text_embeddings is not None:
            if groups is None:
                groups = torch.arange(len(image_embeddings)) + sum(len(e[2]) for e in self._embeddings)
            self._embeddings.append((image_embeddings.float().cpu(), text_embeddings.float().cpu(), groups.cpu()))

    def compute_scalars(self) -> dict[str, float]:
        """Macro and per-label zero-shot values, and retrieval recalls when kept.

        A label with no positive (or no negative) example has no AUROC; it is left out of the
        macro average (and reported as NaN per label).
        """
        defined = self._labels_with_both_classes()
        with merged_metrics_compute():
            values = {name: metric.compute() for name, metric in self.zero_shot.items() if name != "auroc"}
            values["auroc"] = self._auroc(defined)
        scalars: dict[str, float] = {}
        auroc = values["auroc"].float()
        scalars["macro_auroc"] = float(auroc[defined].mean()) if defined.any() else float("nan")
        scalars["macro_f1"] = float(values["f1"].float().mean())
        scalars["accuracy"] = float(values["accuracy"].float().mean())
        for index, name in enumerate(self.label_names):
            scalars[f"auroc/{name}"] = float(auroc[index]) if defined[index] else float("nan")
        counts = self.export_counts() if self._embeddings else self._retrieval_counts
        for key in counts:
            if key.endswith(".hits"):
                name = key.removesuffix(".hits")
                queries = counts[f"{name}.queries"]
                scalars[name.replace("@", "_recall@")] = counts[key] / queries if queries else float("nan")
        return scalars

    def export_counts(self) -> dict[str, float]:
        """Retrieval within the kept embeddings as counts: per direction and K, ``hits`` and
        ``queries`` (``"i2t@5.hits"`` ...), plus any merged from other sites."""
        counts = dict(self._retrieval_counts)
        if self._embeddings:
            images = torch.cat([e[0] for e in self._embeddings])
            texts = torch.cat([e[1] for e in self._embeddings])
            groups = torch.cat([e[2] for e in self._embeddings])
            for direction, (queries, gallery) in {"i2t": (images, texts), "t2i": (texts, images)}.items():
                for k, value in retrieval_recall(queries, gallery, groups, self.retrieval_k).items():
                    name = f"{direction}@{k}"
                    counts[f"{name}.hits"] = counts.get(f"{name}.hits", 0.0) + round(value * len(images))
                    counts[f"{name}.queries"] = counts.get(f"{name}.queries", 0.0) + len(images)
        return counts

    def merge_counts(self, counts: dict[str, float]) -> None:
        """Add another site's :meth:`export_counts`."""
        for key, value in counts.items():
            self._retrieval_counts[key] = self._retrieval_counts.get(key, 0.0) + float(value)

    def reset(self) -> None:
        self.zero_shot.reset()
        self._embeddings = []
        self._retrieval_counts = {}

    def _auroc(self, defined: torch.Tensor) -> torch.Tensor:
        """Per-label AUROC, NaN where a label lacks a positive or a negative (torchmetrics' exact
        multilabel AUROC raises on a label with no valid sample, so labels are scored one by one)."""
        metric = self.zero_shot["auroc"]
        if metric.thresholds is not None:  # binned: counts per threshold, defined for every label
            return metric.compute().float()
        from torchmetrics.functional.classification import binary_auroc
        from torchmetrics.utilities import dim_zero_cat

        auroc = torch.full((len(self.label_names),), float("nan"))
        if not metric.preds:  # nothing was evaluated
            return auroc
        preds, target = dim_zero_cat(metric.preds), dim_zero_cat(metric.target)
        for label in torch.nonzero(defined).flatten().tolist():
            known = target[:, label] != IGNORE
            auroc[label] = binary_auroc(preds[known, label], target[known, label])
        return auroc

    def _labels_with_both_classes(self) -> torch.Tensor:
        stat = self.zero_shot["f1"]
        tp, fp, tn, fn = (getattr(stat, name) for name in ("tp", "fp", "tn", "fn"))
        positives, negatives = tp + fn, tn + fp
        return (positives > 0) & (negatives > 0)


def linear_probe_auroc(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    shots: int,
    seed: int,
    weight_decay: float = 1e-3,
) -> dict[int, float]:
    """Few-shot linear probe: per label, logistic regression on ``shots`` positives and
    ``shots`` negatives drawn (seeded) from the training features; AUROC on the test features.

    Labels with fewer than ``shots`` known positives or negatives in training, or without both
    classes in test, are left out of the result.

    Returns:
        ``{label index: test AUROC}``.
    """
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    result: dict[int, float] = {}
    for label in range(train_labels.shape[1]):
        positives = np.flatnonzero(train_labels[:, label] == 1)
        negatives = np.flatnonzero(train_labels[:, label] == 0)
        known_test = ~np.isnan(test_labels[:, label])
        test_targets = test_labels[known_test, label]
        if min(len(positives), len(negatives)) < shots or len(np.unique(test_targets)) < 2:
            continue
        rows = np.concatenate(
            [rng.choice(positives, shots, replace=False), rng.choice(negatives, shots, replace=False)]
        )
        x = torch.tensor((train_features[rows] - mean) / std, dtype=torch.float64)
        y = torch.tensor(train_labels[rows, label], dtype=torch.float64)
        weights = fit_logistic_regression(x, y, weight_decay)
        test_x = torch.tensor((test_features[known_test] - mean) / std, dtype=torch.float64)
        scores = test_x @ weights[:-1] + weights[-1]
        result[label] = float(binary_auroc(scores.float(), torch.tensor(test_targets).long()))
    return result


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 100) -> torch.Tensor:
    """L2-regularised logistic regression by L-BFGS; returns ``[D + 1]`` weights (bias last)."""
    weights = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + weight_decay * (weights[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()
