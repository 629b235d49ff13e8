"""The plain message exchanges of a round: send, wait, sort replies into answers and failures.

:class:`RoundExchange` is what the round loop hands its aggregator
(:class:`~fedvlm.federation.aggregation.Exchange`): the training exchange decodes every reply
with the round's update codec and leaves out clients that raised, timed out or sent non-finite
weights; :func:`exchange` is the send-and-sort step every exchange (train, evaluate, query) uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.callback import non_finite_keys
from fedvlm.federation.codecs import UpdateCodec
from fedvlm.federation.messages import content_bytes, error_reason


def exchange(
    grid: Grid, messages: list[Message], nodes: Mapping[int, int], timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send, then sort replies into answers and failures, both keyed by partition id."""
    partition_of = {node: pid for pid, node in nodes.items()}
    expected = {partition_of[m.metadata.dst_node_id] for m in messages}
    answered: dict[int, Message] = {}
    failed: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        pid = partition_of.get(reply.metadata.src_node_id)
        if pid is None:
            continue
        if reply.has_error():
            failed[pid] = error_reason(reply)
        else:
            answered[pid] = reply
    for pid in expected - set(answered) - set(failed):
        failed[pid] = f"no reply within federation.round_timeout={timeout:g}s"
    return answered, failed


@dataclass(frozen=True)
class RoundTraffic:
    """Bytes of a round's training exchange: every message sent, and every reply (the uplink)."""

    sent: int
    received: int


@dataclass
class RoundExchange:
    """One round's reach to its clients.

    Attributes:
        grid: Where the clients are.
        nodes: Partition id → node id of every client in the run.
        reference: The state the server sent (its downlink keys): what the clients start from.
        client_sizes: Partition id → training examples, as each client reported at the start.
        timeout: Seconds to wait for replies (``federation.round_timeout``).
        codec: How the clients packed their updates.
    """

    grid: Grid
    nodes: Mapping[int, int]
    reference: Mapping[str, torch.Tensor]
    client_sizes: Mapping[int, int]
    timeout: float
    codec: UpdateCodec

    def train(self, contents: Mapping[int, Any]) -> RoundReplies:
        """Every sampled client's decoded update, the failures, and the bytes both ways."""
        messages = [
            Message(content, dst_node_id=self.nodes[pid], message_type=keys.TRAIN) for pid, content in contents.items()
        ]
        bytes_sent = sum(content_bytes(content) for content in contents.values())
        replies, failed = exchange(self.grid, messages, self.nodes, self.timeout)
        updates = []
        bytes_received = 0
        for pid, reply in sorted(replies.items()):
            bytes_received += content_bytes(reply.content)
            update = decode_update(pid, reply.content, self.reference, self.codec)
            if isinstance(update, str):
                failed[pid] = update
            else:
                updates.append(update)
        return RoundReplies(updates, failed, bytes_sent, bytes_received)


def decode_update(
    partition_id: int, content: RecordDict, reference: Mapping[str, torch.Tensor], codec: UpdateCodec
) -> ClientUpdate | str:
    """A train reply's update, decoded against the state the client started from, or why it is left out."""
    record = content.array_records[keys.ARRAYS]
    metrics = {k: float(v) for k, v in content.metric_records[keys.METRICS].items()}  # type: ignore[arg-type]
    state = codec.decode(record, reference)  # the state the server sent, every key
    non_finite = non_finite_keys(state)
    if non_finite:  # a faulty or malicious client: left out like one that raised
        return f"sent non-finite weights (NaN/Inf) in {non_finite[:3]}"
    return ClientUpdate(partition_id, int(metrics[keys.NUM_EXAMPLES]), state, metrics)


__all__ = ["RoundExchange", "RoundTraffic", "decode_update", "exchange"]
