"""Metric state that merges across clients: what a client may send, and how the server pools it.

Across clients we **merge metric state, we don't average numbers**: the mean of per-site AUROCs
is not the pooled AUROC. The tasks' metrics (:mod:`fedvlm.tasks.leukemia.metrics`,
:mod:`fedvlm.tasks.cxr.metrics`) have sum-reduced state (confusion counts, binned ROC
counts), so a client can send its state — counts, never per-sample values — and the server sums
the states and computes the pooled value exactly as if it had seen all the data
(:func:`export_state`, :func:`merge_states`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torchmetrics import Metric

AUROC_BINS = 200
"""Thresholds of the binned AUROC whose state is mergeable (a ``[bins, 2, 2]`` count tensor)."""

COUNTS_PREFIX = "counts."
"""Exported-state prefix of counts a metrics module computes itself (``export_counts``)."""


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
