"""Buffered asynchronous aggregation (``federation.mode=async``): FedBuff with staleness weights.

The server keeps ``clients_per_round`` clients busy (0: every client). Each trains from the
global version ``v`` it received; when its reply arrives the server is at version ``v'`` and the
update's **staleness** is ``τ = v' − v``. Every ``buffer_size`` (K) updates make one new version
(Nguyen et al. 2022, FedBuff), each weighted as in Eq. 31 of Fed-MMX,

    θ(t+1) = θ(t) + Σ_c α_c Δ_c,   α_c ∝ (N_c / N) · s(τ_c),   Σ_c α_c = 1 within the buffer,

with ``s`` the staleness function (``federation.staleness``: ``e^(−λτ)`` or ``(1+τ)^−a``) and
``Δ_c`` the client's change from the version it trained on. The strategy then takes its server
step (FedAvgM's ``server_learning_rate`` and momentum), so only linear strategies apply. Updates
staler than ``max_staleness`` are dropped and counted (``dropped_stale``). A client is given new
work as soon as it replies (or vanishes), with the newest version.

Order follows the **virtual clock** (:mod:`fedvlm.federation.clock`), not the order in which
replies reach this process: the reply processed next is the one whose task finishes first on the
clock, so a run is repeatable and a resume continues exactly. The same loop runs on Flower's
simulation and deployment Grids (``push_messages`` to idle nodes, ``pull_messages`` of the reply
that is due). Each version's row in ``metrics.jsonl`` has ``virtual_time`` (the clock at the
aggregation), ``staleness_mean``, ``staleness_max``, ``dropped_stale`` and ``vanished``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedvlm.errors import FederationError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import Aggregator, ClientUpdate, RoundReplies
from fedvlm.federation.clock import VANISHED, VirtualClock
from fedvlm.federation.codecs import UpdateCodec
from fedvlm.federation.exchange import RoundTraffic, decode_update
from fedvlm.federation.messages import content_bytes, error_reason
from fedvlm.registry import Registry

State = dict[str, torch.Tensor]
DISPATCH_STREAM = 15_485_863
"""Seed stream of the choice of idle clients (apart from sampling, speeds and dropout)."""
PULL_SECONDS = 0.05
"""How often the loop asks the Grid for the reply that is due."""


class StalenessWeight(Protocol):
    """``s(τ)``: the weight of an update ``τ`` versions stale, relative to a fresh one."""

    def __call__(self, staleness: int) -> float: ...


staleness_weights: Registry[StalenessWeight] = Registry("staleness function")
"""``federation.staleness.name`` → :class:`StalenessWeight` class."""


@dataclass
class ExponentialOptions:
    """``lam``: λ of ``e^(−λτ)`` (0: every update weighs the same)."""

    lam: float = 0.5

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam={self.lam} must be >= 0")


@staleness_weights.register("exponential", options=ExponentialOptions)
class ExponentialStaleness:
    """``s(τ) = e^(−λτ)`` (Eq. 31 of Fed-MMX).

    Example:
        >>> s = ExponentialStaleness(lam=0.5)
        >>> [round(s(tau), 4) for tau in (0, 1, 2)]
        [1.0, 0.6065, 0.3679]
    """

    def __init__(self, lam: float = 0.5) -> None:
        self.lam = lam

    def __call__(self, staleness: int) -> float:
        return math.exp(-self.lam * staleness)


@dataclass
class PolynomialOptions:
    """``a``: the exponent of ``(1 + τ)^−a`` (FedBuff's and FedAsync's choice; 0: no decay)."""

    a: float = 0.5

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"a={self.a} must be >= 0")


@staleness_weights.register("polynomial", options=PolynomialOptions)
class PolynomialStaleness:
    """``s(τ) = (1 + τ)^−a`` (Xie et al. 2019, FedAsync; Nguyen et al. 2022, FedBuff).

    Example:
        >>> s = PolynomialStaleness(a=0.5)
        >>> [round(s(tau), 4) for tau in (0, 1, 3)]
        [1.0, 0.7071, 0.5]
    """

    def __init__(self, a: float = 0.5) -> None:
        self.a = a

    def __call__(self, staleness: int) -> float:
        return float((1.0 + staleness) ** -self.a)


def buffer_weights(buffered: Sequence[tuple[int, int]], staleness: StalenessWeight) -> list[float]:
    """α of each ``(N_c, τ_c)`` in a buffer: ``N_c · s(τ_c)``, normalised to sum to 1.

    Example:
        >>> [round(a, 4) for a in buffer_weights([(10, 0), (10, 1)], ExponentialStaleness(lam=math.log(3)))]
        [0.75, 0.25]
    """
    raw = [num_examples * staleness(tau) for num_examples, tau in buffered]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"a buffer's weights sum to {total}: every update has no examples or zero weight")
    return [w / total for w in raw]


def duration_weights(buffered: Sequence[tuple[int, float, int]], staleness: StalenessWeight) -> list[float]:
    """α of each ``(N_c, d_c / d̄, τ_c)`` in a buffer (``federation.weight_by_duration``):
    ``N_c · (d_c / d̄) · s(τ_c) / Σ N``, so they sum to the buffer's weighted mean of ``(d/d̄)·s(τ)``.

    A client whose task takes ``d`` sends ``T / d`` updates in a time ``T``; weighing each by ``d``
    makes its total weight over time ``∝ N_c``, as in FedAvg, however fast it is. The sum is not
    renormalised to 1, or a buffer of only fast clients (a common one) would take a full step:
    such a buffer moves the model by the share of time its work stands for. (Normalised within the
    buffer, Eq. 31 lets a client that is 40× faster than the median make most of the versions.)

    Example:
        >>> duration_weights([(10, 0.5, 0), (10, 0.5, 0)], ExponentialStaleness(lam=0.5))  # two quick updates
        [0.25, 0.25]
    """
    total = sum(num_examples for num_examples, _, _ in buffered)
    if total <= 0:
        raise ValueError(f"a buffer's example counts sum to {total}")
    return [n * relative * staleness(tau) / total for n, relative, tau in buffered]


@dataclass(frozen=True)
class Dispatch:
    """Work given to a client: train from ``version``, from ``start`` to ``finish`` on the clock.

    Attributes:
        index: The run's count of dispatches before this one (seeds the client's training).
        partition_id: The client.
        version: The global version it trains from.
        start: Virtual time it received the model.
        finish: Virtual time its reply arrives, or it is noticed to have vanished.
        vanished: It vanishes instead of replying (``federation.dropout``).
    """

    index: int
    partition_id: int
    version: int
    start: float
    finish: float
    vanished: bool


class AsyncSchedule:
    """Which client works when, and the order the server hears back (independent of Flower).

    Args:
        clock: Task durations and vanishing draws.
        partition_ids: The clients that may be given work.
        concurrency: Clients at work at once.
        seed: The run's seed (the choice among idle clients).

    Example:
        >>> clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 1, 1: 1, 2: 1}, 1, 0.0, 0)
        >>> schedule = AsyncSchedule(clock, [0, 1, 2], concurrency=3, seed=0)
        >>> [(d.partition_id, d.finish) for d in schedule.fill(version=0)]
        [(0, 1.0), (1, 2.0), (2, 4.0)]
        >>> first = schedule.pop_next()
        >>> first.partition_id, schedule.now
        (0, 1.0)
        >>> [(d.partition_id, d.start, d.finish) for d in schedule.fill(version=1)]  # 0 works again
        [(0, 1.0, 2.0)]
    """

    def __init__(self, clock: VirtualClock, partition_ids: Sequence[int], concurrency: int, seed: int) -> None:
        self.clock = clock
        self.partition_ids = sorted(int(p) for p in partition_ids)
        self.concurrency = min(concurrency if concurrency > 0 else len(self.partition_ids), len(self.partition_ids))
        self.seed = seed
        self.now = 0.0
        self.dispatched = 0
        self.in_flight: dict[int, Dispatch] = {}  # dispatch index → dispatch

    def fill(self, version: int) -> list[Dispatch]:
        """Give work (the global ``version``) to idle clients until ``concurrency`` are busy."""
        busy = {d.partition_id for d in self.in_flight.values()}
        new = []
        while len(self.in_flight) < self.concurrency:
            idle = [pid for pid in self.partition_ids if pid not in busy]
            if self.concurrency == len(self.partition_ids):  # every client works: no choice to make
                pid = idle[0]
            else:
                pid = int(np.random.default_rng([self.seed, DISPATCH_STREAM, self.dispatched]).choice(idle))
            task = self.clock.task(pid, self.now, self.dispatched)
            dispatch = Dispatch(self.dispatched, pid, version, task.start, task.finish, task.vanished)
            self.in_flight[dispatch.index] = dispatch
            self.dispatched += 1
            busy.add(pid)
            new.append(dispatch)
        return new

    def pop_next(self) -> Dispatch:
        """The task that ends first on the clock (ties: the earlier dispatch); the clock moves to it."""
        index = min(self.in_flight, key=lambda i: (self.in_flight[i].finish, i))
        dispatch = self.in_flight.pop(index)
        self.now = dispatch.finish
        return dispatch

    def take(self, index: int, now: float) -> Dispatch:
        """Dispatch ``index`` ended (its reply arrived) at ``now``: the clock moves to it."""
        dispatch = self.in_flight.pop(index)
        self.now = max(self.now, now)
        return dispatch

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run continues from (the clock, the count, the clients at work)."""
        return {
            "now": self.now,
            "dispatched": self.dispatched,
            "in_flight": [asdict(d) for d in self.in_flight.values()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.now = float(state["now"])
        self.dispatched = int(state["dispatched"])
        self.in_flight = {int(d["index"]): Dispatch(**d) for d in state["in_flight"]}


class RoundHost(Protocol):
    """What the asynchronous loop needs of the server (:class:`~fedvlm.federation.server.FederatedServer`)."""

    cfg: Any
    aggregator: Aggregator
    codec: UpdateCodec
    clock: VirtualClock | None
    client_sizes: dict[int, int]
    progress: Any
    async_state: Any

    def round_config(self, server_round: int, task_index: int) -> dict[str, Any]: ...

    def train_content(self, round_config: Mapping[str, Any], state: State) -> RecordDict: ...

    def sent_state(self) -> State: ...

    def apply(self, aggregated: State) -> float: ...

    def training_metrics(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]: ...

    def check_budget(self, server_round: int, failed: Mapping[int, str]) -> None: ...

    def conclude(
        self,
        grid: Grid,
        nodes: Mapping[int, int],
        row: dict[str, Any],
        traffic: RoundTraffic,
        failed: Mapping[int, str],
        started: float,
        norm: float,
    ) -> None: ...


@dataclass
class _Sent:
    message_id: str
    pushed: float  # wall clock, for federation.round_timeout


class AsyncRounds:
    """Runs the remaining global versions of an asynchronous run on ``grid`` (module docstring).

    Args:
        host: The server (global state, aggregator, evaluation and bookkeeping).
        grid: Where the clients are.
        nodes: Partition id → node id of the clients that may train.
        restored: The ``async_state`` of the checkpoint a resumed run continues from ({}: none).
        arrival_order: Take replies as they arrive, the clock reading wall seconds (the deployment
            engine, where sites have real speeds), instead of in the virtual clock's order (a
            repeatable simulation). Simulated vanishing is then immediate.
    """

    def __init__(
        self,
        host: RoundHost,
        grid: Grid,
        nodes: Mapping[int, int],
        restored: Mapping[str, Any],
        arrival_order: bool = False,
    ) -> None:
        federation = host.cfg.federation
        if host.clock is None:
            raise RuntimeError("the server builds its virtual clock before the asynchronous loop starts")
        self.host, self.grid, self.nodes = host, grid, dict(nodes)
        self.buffer_size = int(federation.buffer_size)
        self.max_staleness = int(federation.max_staleness)
        self.weight_by_duration = bool(federation.weight_by_duration)
        self.mean_duration = sum(host.clock.duration(pid) for pid in nodes) / max(len(nodes), 1)
        self.staleness: StalenessWeight = staleness_weights.build(federation.staleness)
        self.timeout = float(federation.round_timeout)
        self.schedule = AsyncSchedule(host.clock, sorted(nodes), int(federation.clients_per_round), int(host.cfg.seed))
        self.version = int(host.progress.completed_round)
        self.versions: dict[int, State] = {self.version: host.sent_state()}  # the models clients hold
        if restored:
            self.schedule.load_state_dict(restored["schedule"])
            self.versions.update({int(v): dict(state) for v, state in restored["versions"].items()})
        else:
            self.schedule.now = float(host.progress.virtual_time)
        self.sent: dict[int, _Sent] = {}
        self.arrival_order = arrival_order
        self.arrived: dict[int, Message] = {}  # arrival order: replies pulled, by dispatch index
        self.wall_origin = time.monotonic() - self.schedule.now  # arrival order: the clock in wall seconds
        host.async_state = self.state_dict

    def state_dict(self) -> dict[str, Any]:
        """Saved with each version: the schedule, and the model versions clients at work hold."""
        held = {d.version for d in self.schedule.in_flight.values()}
        return {"schedule": self.schedule.state_dict(), "versions": {v: self.versions[v] for v in sorted(held)}}

    def run(self) -> None:
        """Aggregate until ``federation.rounds`` versions exist (or the run converged)."""
        host, rounds = self.host, int(self.host.cfg.federation.rounds)
        for dispatch in sorted(self.schedule.in_flight.values(), key=lambda d: d.index):
            self._send(dispatch)  # a resumed run re-sends the work that was in flight
        self._send_all(self.schedule.fill(self.version))
        buffer: list[tuple[Dispatch, ClientUpdate]] = []
        failed: dict[int, str] = {}
        dropped_stale = vanished = failures = 0
        sent_bytes = received_bytes = 0
        started = time.perf_counter()
        max_time = float(host.cfg.federation.max_virtual_time)
        while self.version < rounds and not host.progress.converged:
            if 0 < max_time <= self.schedule.now:
                break  # the simulated duration is over (federation.max_virtual_time)
            dispatch = self._next_arrival() if self.arrival_order else self.schedule.pop_next()
            if dispatch.vanished:
                failed[dispatch.partition_id] = VANISHED
                vanished += 1
            else:
                outcome, nbytes = self._receive(dispatch)
                received_bytes += nbytes
                if isinstance(outcome, str):
                    failed[dispatch.partition_id] = outcome
                    host.check_budget(self.version + 1, {dispatch.partition_id: outcome})
                    failures += 1
                    if failures > len(self.nodes):
                        raise FederationError(
                            f"version {self.version + 1}: {failures} client tasks failed since the last aggregation "
                            f"(more than the {len(self.nodes)} clients); last: client {dispatch.partition_id}: "
                            f"{outcome}. Versions up to {self.version} are saved: continue with `fedvlm fit --resume`"
                        )
                elif self.version - dispatch.version > self.max_staleness:
                    dropped_stale += 1
                else:
                    buffer.append((dispatch, outcome))
            if len(buffer) >= self.buffer_size:
                norm = self._aggregate(buffer)
                row: dict[str, Any] = {"round": self.version, **host.training_metrics([u for _, u in buffer])}
                sample_rate = self.buffer_size / len(self.nodes)
                row.update(host.aggregator.round_metrics(self.version, sample_rate))
                taus = [self.version - 1 - d.version for d, _ in buffer]
                row.update(
                    {
                        "staleness_mean": sum(taus) / len(taus),
                        "staleness_max": max(taus),
                        "dropped_stale": dropped_stale,
                        "vanished": vanished,
                    }
                )
                host.progress.virtual_time = self.schedule.now
                traffic = RoundTraffic(sent_bytes, received_bytes)
                host.conclude(self.grid, self.nodes, row, traffic, failed, started, norm)  # checkpoints
                buffer, failed = [], {}
                dropped_stale = vanished = failures = sent_bytes = received_bytes = 0
                started = time.perf_counter()
            sent_bytes += self._send_all(self.schedule.fill(self.version))
            self._forget_unheld()

    def weights(self, buffer: Sequence[tuple[Dispatch, ClientUpdate]]) -> list[float]:
        """α of the buffer's updates: Eq. 31 normalised within the buffer (:func:`buffer_weights`),
        or with ``weight_by_duration`` :func:`duration_weights` (``d`` the task's time on the clock)."""
        if not self.weight_by_duration:
            return buffer_weights([(u.num_examples, self.version - d.version) for d, u in buffer], self.staleness)
        timed = [
            (u.num_examples, (d.finish - d.start) / self.mean_duration, self.version - d.version) for d, u in buffer
        ]
        return duration_weights(timed, self.staleness)

    def _aggregate(self, buffer: Sequence[tuple[Dispatch, ClientUpdate]]) -> float:
        """One new version from a full buffer: the staleness-weighted mean change, then the server step."""
        host = self.host
        alphas = self.weights(buffer)
        mean_delta: State = {}
        for alpha, (_, update) in zip(alphas, buffer, strict=True):
            for key, delta in update.state.items():
                mean_delta[key] = mean_delta.get(key, 0.0) + alpha * delta  # type: ignore[assignment, operator]
        updates = [ClientUpdate(u.partition_id, u.num_examples, {}, u.metrics) for _, u in buffer]
        # The weighted mean change is what the strategy aggregates (as the sum SecAgg+ reveals).
        replies = RoundReplies(updates, {}, mean_delta=mean_delta)
        norm = host.apply(host.aggregator.aggregate(replies, host.global_state))  # type: ignore[attr-defined]
        self.version += 1
        self.versions[self.version] = host.sent_state()
        return norm

    def _send_all(self, dispatches: Sequence[Dispatch]) -> int:
        return sum(self._send(d) for d in dispatches)

    def _send(self, dispatch: Dispatch) -> int:
        """Push the dispatch's work (its version's weights) to its client; returns the bytes sent."""
        if dispatch.vanished:
            return 0  # the client will vanish: nothing it does reaches the server
        host = self.host
        content = host.train_content(
            host.round_config(dispatch.version + 1, dispatch.index), self.versions[dispatch.version]
        )
        message = Message(content, dst_node_id=self.nodes[dispatch.partition_id], message_type=keys.TRAIN)
        (message_id,) = list(self.grid.push_messages([message]))
        self.sent[dispatch.index] = _Sent(message_id, time.monotonic())
        return content_bytes(content)

    def _next_arrival(self) -> Dispatch:
        """Arrival order: the first reply to come in (or a task past ``round_timeout``)."""
        while True:
            for index in sorted(self.schedule.in_flight):
                if self.schedule.in_flight[index].vanished:
                    return self.schedule.take(index, self.schedule.now)
            now = time.monotonic()
            for index, sent in sorted(self.sent.items()):
                replies = list(self.grid.pull_messages([sent.message_id]))
                if replies:
                    self.arrived[index] = replies[0]
                if replies or now - sent.pushed > self.timeout:
                    return self.schedule.take(index, now - self.wall_origin)
            time.sleep(PULL_SECONDS)

    def _receive(self, dispatch: Dispatch) -> tuple[ClientUpdate | str, int]:
        """The dispatch's update as a change from its version (or why it failed), and its bytes."""
        sent = self.sent.pop(dispatch.index)
        reply = self.arrived.pop(dispatch.index, None)
        while reply is None:
            replies = list(self.grid.pull_messages([sent.message_id]))
            if replies:
                reply = replies[0]
                break
            if time.monotonic() - sent.pushed > self.timeout:
                return f"no reply within federation.round_timeout={self.timeout:g}s", 0
            time.sleep(PULL_SECONDS)
        if reply.has_error():
            return error_reason(reply), 0
        reference = self.versions[dispatch.version]
        update = decode_update(dispatch.partition_id, reply.content, reference, self.host.codec)
        if isinstance(update, str):
            return update, content_bytes(reply.content)
        delta = {k: v.double() - reference[k].double() for k, v in update.state.items()}
        return ClientUpdate(update.partition_id, update.num_examples, delta, update.metrics), content_bytes(
            reply.content
        )

    def _forget_unheld(self) -> None:
        held = {d.version for d in self.schedule.in_flight.values()} | {self.version}
        for version in [v for v in self.versions if v not in held]:
            del self.versions[version]


__all__ = [
    "AsyncRounds",
    "AsyncSchedule",
    "Dispatch",
    "ExponentialStaleness",
    "PolynomialStaleness",
    "StalenessWeight",
    "buffer_weights",
    "duration_weights",
    "staleness_weights",
]
