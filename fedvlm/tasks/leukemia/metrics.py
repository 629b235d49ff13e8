"""Leukemia metrics as torchmetrics, with state that merges across clients.

Detection and staging metrics of Fed-MMX, every one with sum-reduced state (confusion counts,
binned ROC counts), so a client sends counts and the server computes pooled values
(:func:`fedvlm.evaluation.metrics.export_state`, :func:`~fedvlm.evaluation.metrics.merge_states`).
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryConfusionMatrix,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fedvlm.evaluation.metrics import AUROC_BINS, merged_metrics_compute

MATRIX_METRICS = ("confusion_matrix", "stage_confusion_matrix")


class LeukemiaMetrics(torch.nn.Module):
    """Detection and staging metrics of Fed-MMX.

    Detection (leukemia yes/no): accuracy, AUROC, F1, confusion matrix. Staging: macro F1,
    macro precision, macro recall, accuracy and confusion matrix of the stage head, computed on
    the true positives with a known stage (the stage head's task is to stage a leukemia case).

    Args:
        num_stages: Number of clinical stages ``K``.
        auroc_bins: Thresholds of the binned AUROC (mergeable state). ``None`` keeps every
            score (exact AUROC; only for data that stays in one place, e.g. the server's test set).

    Example:
        >>> metrics = LeukemiaMetrics(num_stages=2)
        >>> metrics.update(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 1]),
        ...                torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]), torch.tensor([0, -1, 1]))
        >>> {k: round(v, 3) for k, v in metrics.compute_scalars().items()}["stage_macro_f1"]
        1.0
    """

    def __init__(self, num_stages: int, auroc_bins: int | None = AUROC_BINS) -> None:
        super().__init__()
        self.num_stages = num_stages
        self.detection = MetricCollection(
            {
                "accuracy": BinaryAccuracy(),
                "auroc": BinaryAUROC(thresholds=auroc_bins),
                "f1": BinaryF1Score(),
                "confusion_matrix": BinaryConfusionMatrix(),
            },
            compute_groups=False,  # every metric keeps its own state, so states merge one by one
        )
        self.staging = MetricCollection(
            {
                "stage_macro_f1": MulticlassF1Score(num_stages, average="macro"),
                "stage_macro_precision": MulticlassPrecision(num_stages, average="macro"),
                "stage_macro_recall": MulticlassRecall(num_stages, average="macro"),
                "stage_accuracy": MulticlassAccuracy(num_stages, average="micro"),
                "stage_confusion_matrix": MulticlassConfusionMatrix(num_stages),
            },
            compute_groups=False,
        )

    def update(
        self,
        leukemia_prob: torch.Tensor,
        leukemia: torch.Tensor,
        stage_prob: torch.Tensor,
        stage: torch.Tensor,
    ) -> None:
        """Add a batch.

        Args:
            leukemia_prob: ``[B]`` predicted probability of leukemia.
            leukemia: ``[B]`` true label (0/1).
            stage_prob: ``[B, K]`` predicted stage probabilities.
            stage: ``[B]`` true 0-based stage, ``-1`` for negatives and unknown stages.
        """
        self.detection.update(leukemia_prob, leukemia.long())
        staged = stage >= 0
        if staged.any():
            self.staging.update(stage_prob[staged], stage[staged].long())

    def compute(self) -> dict[str, torch.Tensor]:
        """All metric values, confusion matrices included (NaN-free: empty staging gives 0)."""
        with merged_metrics_compute():
            values = dict(self.detection.compute())
        if self._has_stage_updates():
            with merged_metrics_compute():
                values.update(self.staging.compute())
        else:
            values.update({str(name): torch.tensor(0.0) for name in self.staging if name not in MATRIX_METRICS})
            values["stage_confusion_matrix"] = torch.zeros(self.num_stages, self.num_stages, dtype=torch.long)
        return values

    def compute_scalars(self) -> dict[str, float]:
        """The scalar metrics as floats (what goes into ``metrics.jsonl``)."""
        return {k: float(v) for k, v in self.compute().items() if k not in MATRIX_METRICS}

    def reset(self) -> None:
        self.detection.reset()
        self.staging.reset()

    def _has_stage_updates(self) -> bool:
        """Whether any staged sample was counted, here or in a merged state."""
        confmat = self.staging["stage_confusion_matrix"].metric_state["confmat"]  # type: ignore[index]
        return bool(torch.as_tensor(confmat).sum())
