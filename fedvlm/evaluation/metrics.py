"""Leukemia metrics as torchmetrics, with state that merges across clients.

Across clients we **merge metric state, we don't average numbers**: the mean of per-site AUROCs
is not the pooled AUROC. Every metric here has sum-reduced state (confusion counts, binned ROC
counts), so a client can send its state — counts, never per-sample values — and the server sums
the states and computes the pooled value exactly as if it had seen all the data
(:func:`export_state`, :func:`merge_states`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torchmetrics import Metric, MetricCollection
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

AUROC_BINS = 200
"""Thresholds of the binned AUROC whose state is mergeable (a ``[bins, 2, 2]`` count tensor)."""

COUNTS_PREFIX = "counts."
"""Exported-state prefix of counts a metrics module computes itself (``export_counts``)."""
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


def export_state(metrics: torch.nn.Module) -> dict[str, list[float]]:
    """Flatten every torchmetrics state inside ``metrics`` into ``{"name.state": values}``.

    Only counts leave: a metric whose state is not sum-reduced (e.g. an exact AUROC holding
    every score) is refused, because it would carry per-sample values.

    Raises:
        ValueError: Naming the metric whose state is not mergeable by summation.
    """
    exported: dict[str, list[float]] = {}
    for name, metric in _metrics(metrics):
        for state_name, value in metric.metric_state.items():
            if not isinstance(value, torch.Tensor):  # a list state: one entry per sample
                raise ValueError(
                    f"metric {name!r} state {state_name!r} is not sum-reduced counts and cannot "
                    "leave a client (use binned thresholds)"
                )
            exported[f"{name}.{state_name}"] = value.detach().flatten().double().tolist()
    counts = getattr(metrics, "export_counts", None)  # counts a metric computes locally (retrieval hits)
    if counts is not None:
        exported.update({f"{COUNTS_PREFIX}{key}": [float(value)] for key, value in counts().items()})
    return exported


def merge_states(metrics: torch.nn.Module, states: Sequence[Mapping[str, Sequence[float]]]) -> None:
    """Add the exported states of several clients into ``metrics`` (not yet computed; it may hold
    data already), through torchmetrics' ``Metric.merge_state`` (each state reduced its own way).

    Raises:
        KeyError: If a state is missing from one of ``states``.
    """
    for name, metric in _metrics(metrics):
        for state in states:
            incoming = {}
            for state_name, current in metric.metric_state.items():
                assert isinstance(current, torch.Tensor)  # list states never leave a client (export_state)
                values = torch.tensor(state[f"{name}.{state_name}"], dtype=torch.float64)
                incoming[state_name] = values.reshape(current.shape).to(current.dtype)
            metric.merge_state(incoming)
    merge = getattr(metrics, "merge_counts", None)
    if merge is not None:
        for state in states:
            merge({k.removeprefix(COUNTS_PREFIX): v[0] for k, v in state.items() if k.startswith(COUNTS_PREFIX)})


@contextmanager
def merged_metrics_compute() -> Iterator[None]:
    """Compute metrics that may hold merged states only: ``merge_state`` does not count updates,
    so torchmetrics would warn that ``compute`` ran before ``update``. Metrics here handle an empty
    state themselves (NaN or 0, documented per metric)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* before the ``update``")
        yield


def _metrics(module: torch.nn.Module) -> list[tuple[str, Metric]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Metric)]
