"""Secure aggregation with Flower's SecAgg+ protocol (Bonawitz et al. 2017; Bell et al. 2020).

The server learns only the example-weighted **sum** of the clients' updates, never one update:
each client adds pairwise masks (agreed by Diffie–Hellman with its neighbours) and a private
mask to its quantised update; the pairwise masks cancel in the sum and the private masks are
removed from Shamir shares held by the neighbours, which also let the server rebuild the masks of
a client that drops out after sharing its keys.

Both halves are Flower's own code, wrapped so they fit fedvlm's round loop:

* the server drives the four stages of :class:`flwr.server.workflow.SecAggPlusWorkflow`
  (setup → share keys → collect masked vectors → unmask) for one round, sending fedvlm's own
  train message in the collect stage (:class:`SecureAggregator`);
* the client's train handler is wrapped by :func:`secure_aggregation_mod`, which hands SecAgg+
  messages to :func:`flwr.client.mod.secaggplus_mod` and turns fedvlm's train reply into the
  *delta* ``local − global`` of the floating-point entries that SecAgg+ masks.

Constraints (Flower's implementation): values are clipped to ±``clipping_range`` after scaling
by ``n_k / max_weight`` and quantised, hence deltas rather than weights; integer buffers
(``num_batches_tracked``) are not aggregated and keep their global value; only strategies that
need the sum alone (``linear`` ones: FedAvg, FedProx, FedAvgM) can run. Scalar metrics (training loss, example count)
still travel in the clear, as in plain FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedvlm.errors import ConfigError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import Aggregator, AggregatorWrapper, ClientUpdate, Exchange, RoundReplies
from fedvlm.federation.messages import content_bytes, error_reason

State = dict[str, torch.Tensor]

CLIPPED_FRACTION = "secagg/clipped-fraction"
"""Client metric: the share of weighted-delta coordinates SecAgg+ clipped to ±clipping_range."""


def secure_keys(record: Iterable[str], state: Mapping[str, torch.Tensor]) -> list[str]:
    """The entries SecAgg+ sums, in the order both sides use: floating-point ones, sorted."""
    return sorted(k for k in record if state[k].is_floating_point())


# -- client ---------------------------------------------------------------------------------


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod for the train handler: SecAgg+ when the server runs it, a no-op otherwise.

    Flower's ``secaggplus_mod`` answers the key-agreement stages itself and, in the collect stage,
    calls the train handler and masks what it returns. The handler's reply (fedvlm's arrays and
    metrics) is turned here into the legacy ``FitRes`` that mod expects, holding the delta
    ``local − global`` of every floating-point entry the server sent.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _delta_reply(call_next))


def _delta_reply(call_next: ClientAppCallable) -> ClientAppCallable:
    def handle(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        reference = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
        local = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
        metrics = dict(reply.content.metric_records[keys.METRICS])
        num_examples = int(metrics[keys.NUM_EXAMPLES])  # type: ignore[arg-type]
        deltas = [(local[k].double() - reference[k].double()).float().numpy() for k in secure_keys(local, reference)]
        # Under central DP every client weighs 1 (a uniform mean bounds each client's influence).
        uniform = bool(msg.content.config_records[keys.CONFIG].get(keys.UNIFORM_WEIGHTS, False))
        weight = 1 if uniform else num_examples
        metrics[CLIPPED_FRACTION] = _clipped_fraction(deltas, weight, context)
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(deltas),
            num_examples=weight,
            metrics=cast(dict[str, Any], metrics),
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return handle


def _clipped_fraction(deltas: Sequence[np.ndarray], num_examples: int, context: Context) -> float:
    """What SecAgg+ will clip: coordinates of ``(n/max_weight)·delta`` beyond ±clipping_range.

    The ranges come from the SecAgg+ state Flower's mod keeps in the node's context (stage 0).
    """
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or "clipping_range" not in state or "max_weight" not in state:
        return float("nan")
    limit = float(cast(float, state["clipping_range"]))
    ratio = num_examples / float(cast(float, state["max_weight"]))
    total = sum(d.size for d in deltas)
    clipped = sum(int(np.count_nonzero(np.abs(d) * ratio > limit)) for d in deltas)
    return clipped / total if total else 0.0


# -- server ---------------------------------------------------------------------------------


@dataclass
class SecureRound:
    """What the server learns from one securely aggregated round.

    Attributes:
        mean_delta: ``Σ_k n_k·Δ_k / Σ_k n_k`` over the clients whose masked update was summed.
        replies: Per partition id, the scalar metrics the client sent in the clear.
        failed: Per partition id, why the client dropped out (its masks were removed from shares).
        bytes_sent: Bytes of every message the server sent in the round's four stages.
        bytes_received: Bytes of every reply.
        completed: False when too few clients survived to unmask the sum (nothing was learnt).
    """

    mean_delta: State
    replies: dict[int, dict[str, float]]
    failed: dict[int, str]
    bytes_sent: int
    bytes_received: int
    completed: bool = True


@dataclass
class _Proxy:
    """The node id is all SecAgg+'s workflow uses of a legacy ``ClientProxy``."""

    node_id: int


@dataclass
class _Capture(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow calls: it offers the round's nodes and keeps the
    unmasked sum instead of aggregating anything itself."""

    node_ids: list[int]
    results: list[tuple[ClientProxy, FitRes]] = field(default_factory=list)
    summed: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # The content is replaced by fedvlm's own train message after the setup stage.
        return [(cast(ClientProxy, _Proxy(nid)), FitIns(parameters, {})) for nid in self.node_ids]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = results
        self.summed = results[0][1].parameters if results else None  # every result carries the sum
        return self.summed, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:  # type: ignore[type-arg]
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:  # type: ignore[type-arg]
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:  # type: ignore[type-arg]
        return None


class _MeteredGrid:
    """A grid that counts the bytes of every message and remembers which nodes answered with an error."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = error_reason(reply)
            else:
                self.bytes_received += content_bytes(reply.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class SecureAggregator:
    """Runs a round's training exchange under SecAgg+ and returns only the weighted mean delta.

    Args:
        settings: ``federation.secure_aggregation``.
        timeout: Seconds to wait for the replies of each stage.
    """

    def __init__(self, settings: DictConfig, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout

    def run(
        self,
        grid: Grid,
        contents: Mapping[int, RecordDict],
        nodes: Mapping[int, int],
        reference: Mapping[str, torch.Tensor],
        client_sizes: Mapping[int, int],
        server_round: int,
    ) -> SecureRound:
        """One round: ``contents`` maps partition id → the train message content for that client.

        Args:
            grid: Where the clients are.
            contents: The round's train message per sampled partition (global arrays + config).
            nodes: Partition id → node id.
            reference: The global state the clients start from (to know the shapes and keys).
            client_sizes: Partition id → training examples (for ``max_weight`` when not set).
            server_round: The round number.

        Under central DP the round config says ``uniform-weights``: every client then weighs 1
        instead of its example count, on the clients' side and here alike.
        """
        node_of = {pid: nodes[pid] for pid in contents}
        partition_of = {node: pid for pid, node in node_of.items()}
        round_config = next(iter(contents.values())).config_records[keys.CONFIG]
        uniform = bool(round_config.get(keys.UNIFORM_WEIGHTS, False))
        max_weight = 1 if uniform else self.settings.max_weight or max(client_sizes.get(pid, 1) for pid in contents)
        workflow = SecAggPlusWorkflow(
            num_shares=_share_setting(self.settings.num_shares),
            reconstruction_threshold=_share_setting(self.settings.reconstruction_threshold),
            max_weight=float(max_weight),
            clipping_range=float(self.settings.clipping_range),
            quantization_range=int(self.settings.quantization_range),
            timeout=self.timeout,
        )
        capture = _Capture(sorted(node_of.values()))
        base = Context(
            run_id=0,
            node_id=0,
            node_config={},
            state=RecordDict(
                {
                    MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                    MAIN_PARAMS_RECORD: ArrayRecord(),
                }
            ),
            run_config={},
        )
        context = LegacyContext(base, strategy=capture)
        metered = _MeteredGrid(grid)
        state = WorkflowState()
        completed = workflow.setup_stage(cast(Grid, metered), context, state)
        if completed:
            # fedvlm's own train message (global arrays + round config) instead of a legacy FitIns
            state.nid_to_fitins = {nid: contents[partition_of[nid]] for nid in state.nid_to_fitins}
            for stage in (workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage):
                if not stage(cast(Grid, metered), context, state):
                    completed = False
                    break
        completed = completed and capture.summed is not None
        replies = {
            partition_of[proxy.node_id]: {k: float(cast(float, v)) for k, v in fitres.metrics.items()}  # in the clear
            for proxy, fitres in capture.results
        }
        failed = {partition_of[node]: why for node, why in metered.errors.items() if node in partition_of}
        for pid in set(contents) - set(replies) - set(failed):
            failed[pid] = "dropped out of secure aggregation (no reply within federation.round_timeout)"
        mean_delta: State = {}
        if completed:
            assert capture.summed is not None
            names = secure_keys(next(iter(contents.values())).array_records[keys.ARRAYS], reference)
            arrays = parameters_to_ndarrays(capture.summed)
            mean_delta = {
                name: torch.from_numpy(np.asarray(a)).reshape(reference[name].shape)
                for name, a in zip(names, arrays, strict=True)
            }
        return SecureRound(mean_delta, replies, failed, metered.bytes_sent, metered.bytes_received, completed)


class SecureAggregation(AggregatorWrapper):
    """Secure aggregation around a linear aggregator: the round's exchange runs SecAgg+.

    Only the weighted mean delta reaches the server (:class:`SecureAggregator`); the inner
    aggregator turns it into the aggregate (FedAvg: the global state plus that delta) and applies
    its server update. Scalar metrics still arrive per client, in the clear.

    Args:
        inner: A linear aggregator (its aggregate is computable from the sum of the updates).
        settings: ``federation.secure_aggregation``.

    Raises:
        ConfigError: If ``inner`` needs each client's update (robust rules).
    """

    def __init__(self, inner: Aggregator, settings: DictConfig) -> None:
        if not inner.linear:
            raise ConfigError(
                f"federation.secure_aggregation.enabled: the server sees only the sum of the updates, so "
                f"{type(inner).__name__} (which needs each client's update) cannot run; use a linear "
                "federation.strategy (fedavg, fedprox, fedavgm)"
            )
        super().__init__(inner)
        self.settings = settings

    def collect(self, exchange: Exchange, contents: Mapping[int, Any], server_round: int) -> RoundReplies:
        secure = SecureAggregator(self.settings, exchange.timeout).run(
            exchange.grid, contents, exchange.nodes, exchange.reference, exchange.client_sizes, server_round
        )
        updates = [
            ClientUpdate(pid, int(metrics[keys.NUM_EXAMPLES]), {}, metrics)
            for pid, metrics in sorted(secure.replies.items())
        ]
        return RoundReplies(
            updates, secure.failed, secure.bytes_sent, secure.bytes_received, secure.mean_delta, secure.completed
        )


def _share_setting(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction."""
    return int(value) if value > 1 else float(value)


__all__ = [
    "CLIPPED_FRACTION",
    "SecureAggregation",
    "SecureAggregator",
    "SecureRound",
    "secure_aggregation_mod",
    "secure_keys",
]
