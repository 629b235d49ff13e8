"""Federated evaluation: the global model on the sites' local validation and test splits.

Each client evaluates the global model on its own splits and returns **metric state** (counts);
the server pools by merging states, never by averaging per-site numbers (the pooled AUROC is the
AUROC over the union), and also reports every site's own values. Which clients are asked, and
when, is the round loop's choice (``federation.evaluate_clients_per_round``, ``evaluate_every``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedvlm.evaluation.metrics import merge_states
from fedvlm.federation import keys
from fedvlm.federation.exchange import exchange
from fedvlm.federation.messages import content_bytes
from fedvlm.tasks import Task


@dataclass
class FederatedEvaluation:
    """What one evaluation exchange returned.

    Attributes:
        pooled: ``val/...`` and ``test/...`` over all answering sites (merged states).
        per_client: Partition id → that client's own ``val/...`` and ``test/...``.
        bytes_sent: Bytes of the messages sent.
        bytes_received: Bytes of the replies.
        failed: Partition id → why it did not answer.
    """

    pooled: dict[str, float] = field(default_factory=dict)
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    failed: dict[int, str] = field(default_factory=dict)


def scalar_values(task: Task, metrics: torch.nn.Module, split: str, where: str) -> dict[str, float]:
    """The task's scalar metrics; a per-label value with no valid sample is NaN, named in a warning."""
    values = task.scalar_metrics(metrics)
    undefined = [k.split("/", 1)[1] for k, v in values.items() if k.startswith("auroc/") and math.isnan(v)]
    if undefined:
        warnings.warn(
            f"{split} split of {where}: no AUROC for label(s) {', '.join(undefined)} (no positive or no "
            "negative sample); they are NaN and left out of the macro average",
            stacklevel=2,
        )
    return values


def evaluate_on_clients(
    grid: Grid,
    nodes: Mapping[int, int],
    downlink: ArrayRecord,
    static_fingerprint: str,
    task: Task,
    cfg: DictConfig,
    site_names: Mapping[int, str],
) -> FederatedEvaluation:
    """Ask ``nodes`` to evaluate ``downlink`` on their local splits; pool their metric states."""
    config = ConfigRecord({keys.STATIC_FINGERPRINT: static_fingerprint})
    messages = [
        Message(RecordDict({keys.ARRAYS: downlink, keys.CONFIG: config}), dst_node_id=node, message_type=keys.EVALUATE)
        for _, node in sorted(nodes.items())
    ]
    result = FederatedEvaluation()
    result.bytes_sent = content_bytes(messages[0].content) * len(messages) if messages else 0  # one content for all
    replies, result.failed = exchange(grid, messages, nodes, float(cfg.federation.round_timeout))
    result.bytes_received = sum(content_bytes(reply.content) for reply in replies.values())
    for split in keys.EVAL_SPLITS:
        states = []
        for pid, reply in sorted(replies.items()):
            metrics = reply.content.metric_records[keys.METRICS]
            if int(metrics[f"{split}/{keys.NUM_EXAMPLES}"]) == 0:  # type: ignore[arg-type]
                continue
            prefix = f"{keys.EVAL_STATE_PREFIX}{split}/"
            state: dict[str, list[float]] = {
                k.removeprefix(prefix): list(v)  # type: ignore[arg-type, misc]
                for k, v in metrics.items()
                if k.startswith(prefix)
            }
            states.append(state)
            local = task.make_metrics(cfg, mergeable=True)
            merge_states(local, [state])
            values = scalar_values(task, local, split, site_names.get(pid, f"client {pid}"))
            result.per_client.setdefault(pid, {}).update({f"{split}/{k}": v for k, v in values.items()})
        if states:
            pooled = task.make_metrics(cfg, mergeable=True)
            merge_states(pooled, states)
            values = scalar_values(task, pooled, split, "all sites")
            result.pooled.update({f"{split}/{k}": v for k, v in values.items()})
    return result


__all__ = ["FederatedEvaluation", "evaluate_on_clients", "scalar_values"]
