"""Reading the replies that come back over a Flower grid."""

from __future__ import annotations

from flwr.app import Message


def error_reason(reply: Message) -> str:
    """The client's exception message, without the Ray/Flower wrapping around it."""
    reason = str(reply.error.reason)
    for line in reversed(reason.splitlines()):
        if "Message:" in line:
            return line.split("Message:", 1)[1].strip().removesuffix("'>").strip()
    return reason.strip().splitlines()[-1] if reason.strip() else f"error code {reply.error.code}"
