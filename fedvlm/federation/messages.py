"""Measuring and reading the messages that cross a Flower grid."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto


def error_reason(reply: Message) -> str:
    """The client's exception message, without the Ray/Flower wrapping around it."""
    reason = str(reply.error.reason)
    for line in reversed(reason.splitlines()):
        if "Message:" in line:
            return line.split("Message:", 1)[1].strip().removesuffix("'>").strip()
    return reason.strip().splitlines()[-1] if reason.strip() else f"error code {reply.error.code}"


def content_bytes(content: RecordDict) -> int:
    """The size of a message's content on the wire: its protobuf encoding (arrays, configs and
    metrics alike), the one definition behind every ``bytes_sent`` / ``bytes_received``."""
    return int(recorddict_to_proto(content).ByteSize())
