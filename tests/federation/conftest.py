"""An in-process Flower grid: the server's messages reach real ClientApps without Ray or sockets."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


@dataclass
class InProcessGrid:
    """Delivers each message to ``app`` with the destination node's persistent ``Context``.

    Contents are deep-copied both ways, as serialisation would, so neither side can see the
    other's objects. Every message and reply is kept in ``sent`` / ``received``.
    """

    app: ClientApp
    node_configs: dict[int, dict[str, int | str]]
    sent: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    contexts: dict[int, Context] = field(default_factory=dict)
    pending: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node, config in self.node_configs.items():
            self.contexts[node] = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})

    def get_node_ids(self) -> list[int]:
        return sorted(self.node_configs)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return [self._deliver(message) for message in messages]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver at once; the reply waits under a new message id until it is pulled."""
        ids = []
        for message in messages:
            message_id = f"message-{len(self.sent)}"
            self.pending[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in message_ids if i in self.pending]

    def _deliver(self, message: Message) -> Message:
        delivered = Message(content=copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata))
        self.sent.append(delivered)
        try:
            reply = self.app(delivered, self.contexts[message.metadata.dst_node_id])
            reply = Message(content=copy.deepcopy(reply.content), metadata=reply.metadata)
        except Exception as err:  # what a SuperNode reports when the ClientApp raises
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
        self.received.append(reply)
        return reply


@pytest.fixture(autouse=True)
def server_task_identity() -> Iterator[None]:
    """What a ServerApp process has set before it creates messages."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
