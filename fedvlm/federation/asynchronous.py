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

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import Aggregator, ClientUpdate, RoundReplies
from fedvlm.federation.clock import VANISHED, VirtualClock
from fedvlm.federation.codecs import UpdateCodec
from fedvlm.federation.exchange import RoundTraffic, decode_update
from fedvlm.federation.messages import content_bytes, error_reason
from fedvlm.federation.secure import SecureAggregator
from fedvlm.federation.staleness import StalenessWeight, buffer_weights, duration_weights, staleness_weights

State = dict[str, torch.Tensor]
DISPATCH_STREAM = 15_485_863
"""Seed stream of the choice of idle clients (apart from sampling, speeds and dropout)."""
PULL_SECONDS = 0.05
"""How often the loop asks the Grid for the reply that is due."""


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
        cohort: Under SecAgg+, the index of the first dispatch of the cohort it was sent with
            (whose updates are summed together); -1 otherwise.
    """

    index: int
    partition_id: int
    version: int
    start: float
    finish: float
    vanished: bool
    cohort: int = -1


class AsyncSchedule:
    """Which client works when, and the order the server hears back (independent of Flower).

    Args:
        clock: Task durations and vanishing draws.
        partition_ids: The clients that may be given work.
        concurrency: Clients at work at once.
        seed: The run's seed (the choice among idle clients).
        cohort_size: Clients dispatched together, from one version, whose updates count only as
            a whole (SecAgg+ over a buffer: :meth:`pop_cohort`); 1: each client on its own.

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

    def __init__(
        self, clock: VirtualClock, partition_ids: Sequence[int], concurrency: int, seed: int, cohort_size: int = 1
    ) -> None:
        self.clock = clock
        self.partition_ids = sorted(int(p) for p in partition_ids)
        self.concurrency = min(concurrency if concurrency > 0 else len(self.partition_ids), len(self.partition_ids))
        if self.concurrency < cohort_size:
            raise ValueError(f"{self.concurrency} clients at work cannot form cohorts of {cohort_size}")
        self.seed = seed
        self.cohort_size = cohort_size
        self.now = 0.0
        self.dispatched = 0
        self.in_flight: dict[int, Dispatch] = {}  # dispatch index → dispatch

    def fill(self, version: int) -> list[Dispatch]:
        """Give work (the global ``version``) to idle clients until ``concurrency`` are busy."""
        if self.cohort_size > 1:
            return self._fill_cohorts(version)
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

    def _fill_cohorts(self, version: int) -> list[Dispatch]:
        """Whole cohorts of idle clients (seeded choice) while ``concurrency`` leaves room for one."""
        busy = {d.partition_id for d in self.in_flight.values()}
        new = []
        while len(self.in_flight) + self.cohort_size <= self.concurrency:
            idle = [pid for pid in self.partition_ids if pid not in busy]
            rng = np.random.default_rng([self.seed, DISPATCH_STREAM, self.dispatched])
            members = idle if len(idle) == self.cohort_size else rng.choice(idle, self.cohort_size, replace=False)
            cohort = self.dispatched
            for pid in sorted(int(p) for p in members):
                task = self.clock.task(pid, self.now, self.dispatched)
                dispatch = Dispatch(self.dispatched, pid, version, task.start, task.finish, task.vanished, cohort)
                self.in_flight[dispatch.index] = dispatch
                self.dispatched += 1
                busy.add(pid)
                new.append(dispatch)
        return new

    def pop_cohort(self) -> list[Dispatch]:
        """The cohort that ends first: when its last member replies or vanishes (the sum of a
        cohort is unmasked at once, and its members stay until then); the clock moves to it.

        Example:
            >>> clock = VirtualClock({0: 1.0, 1: 5.0, 2: 2.0, 3: 3.0}, {p: 1 for p in range(4)}, 1, 0.0, 0)
            >>> schedule = AsyncSchedule(clock, [0, 1, 2, 3], concurrency=4, seed=0, cohort_size=2)
            >>> sorted((d.cohort, d.partition_id) for d in schedule.fill(version=0))
            [(0, 0), (0, 1), (2, 2), (2, 3)]
            >>> [d.partition_id for d in schedule.pop_cohort()], schedule.now  # max(2, 3) < max(1, 5)
            ([2, 3], 3.0)
        """
        ends: dict[int, tuple[float, int]] = {}
        for d in self.in_flight.values():
            ends[d.cohort] = max(ends.get(d.cohort, (d.finish, d.cohort)), (d.finish, d.cohort))
        cohort = min(ends, key=lambda c: ends[c])
        members = [self.in_flight.pop(i) for i in sorted(i for i, d in self.in_flight.items() if d.cohort == cohort)]
        self.now = ends[cohort][0]
        return members

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
class _Tally:
    """What happened since the last version (reported in its row)."""

    failed: dict[int, str] = field(default_factory=dict)
    dropped_stale: int = 0
    vanished: int = 0
    failures: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    def vanish(self, partition_id: int) -> None:
        self.failed[partition_id] = VANISHED
        self.vanished += 1


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
        settings = OmegaConf.select(federation, "secure_aggregation")
        self.secure = SecureAggregator(settings, self.timeout) if settings is not None and settings.enabled else None
        if self.secure is not None and arrival_order:
            raise ConfigError(
                "federation.secure_aggregation.enabled with federation.mode=async runs in simulation only: on the "
                "deployment engine each cohort's four SecAgg+ stages would hold up the replies of the others"
            )
        cohort_size = self.buffer_size if self.secure is not None else 1
        self.schedule = AsyncSchedule(
            host.clock, sorted(nodes), int(federation.clients_per_round), int(host.cfg.seed), cohort_size
        )
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
        if self.secure is not None:
            self._run_secure()
            return
        host, rounds = self.host, int(self.host.cfg.federation.rounds)
        for dispatch in sorted(self.schedule.in_flight.values(), key=lambda d: d.index):
            self._send(dispatch)  # a resumed run re-sends the work that was in flight
        self._send_all(self.schedule.fill(self.version))
        buffer: list[tuple[Dispatch, ClientUpdate]] = []
        tally = _Tally()
        while self.version < rounds and not host.progress.converged and not self._out_of_time():
            dispatch = self._next_arrival() if self.arrival_order else self.schedule.pop_next()
            if dispatch.vanished:
                tally.vanish(dispatch.partition_id)
            else:
                outcome, nbytes = self._receive(dispatch)
                tally.received_bytes += nbytes
                if isinstance(outcome, str):
                    self._failed(tally, dispatch.partition_id, outcome)
                elif self.version - dispatch.version > self.max_staleness:
                    tally.dropped_stale += 1
                else:
                    buffer.append((dispatch, outcome))
            if len(buffer) >= self.buffer_size:
                norm = self._step(self._weighted_mean(buffer), [u for _, u in buffer])
                self._conclude([u for _, u in buffer], [self.version - 1 - d.version for d, _ in buffer], norm, tally)
                buffer, tally = [], _Tally()
            tally.sent_bytes += self._send_all(self.schedule.fill(self.version))
            self._forget_unheld()

    def _run_secure(self) -> None:
        """SecAgg+ over each buffer: cohorts of K clients sent together from one version.

        The server learns only a cohort's weighted mean change ``Σ N_c Δ_c / Σ N_c`` (Flower's
        SecAgg+, :class:`~fedvlm.federation.secure.SecureAggregator`), and only when its last
        member has replied (its members stay in the protocol until then). Every member shares the
        cohort's staleness τ, so Eq. 31's ``α_c = (N_c / N)·s(τ)`` is that mean times ``s(τ)``: the
        factor is common to the cohort, applied to the unmasked mean (folding it into each client's
        ``N_c / max_weight`` before masking gives the same sum, less exactly). The protocol, and the
        members' training, run when the cohort ends on the virtual clock; members that vanish by
        then are left out of it, and a cohort staler than ``max_staleness`` is dropped unrun.
        """
        assert self.secure is not None
        host, rounds = self.host, int(self.host.cfg.federation.rounds)
        self.schedule.fill(self.version)  # nothing is sent yet: a cohort's protocol runs when it ends
        tally = _Tally()
        while self.version < rounds and not host.progress.converged and not self._out_of_time():
            cohort = self.schedule.pop_cohort()
            for dispatch in cohort:
                if dispatch.vanished:
                    tally.vanish(dispatch.partition_id)
            alive = [d for d in cohort if not d.vanished]
            version = cohort[0].version
            if self.version - version > self.max_staleness:
                tally.dropped_stale += len(alive)
            elif alive:
                contents = {
                    d.partition_id: host.train_content(host.round_config(version + 1, d.index), self.versions[version])
                    for d in alive
                }
                result = self.secure.run(
                    self.grid, contents, self.nodes, self.versions[version], host.client_sizes, self.version + 1
                )
                tally.sent_bytes += result.bytes_sent
                tally.received_bytes += result.bytes_received
                for pid, reason in sorted(result.failed.items()):
                    self._failed(tally, pid, reason)
                if result.completed:
                    weight = self.staleness(self.version - version)
                    mean_delta = {k: weight * delta for k, delta in result.mean_delta.items()}
                    updates = [
                        ClientUpdate(pid, int(m[keys.NUM_EXAMPLES]), {}, m) for pid, m in sorted(result.replies.items())
                    ]
                    norm = self._step(mean_delta, updates)
                    self._conclude(updates, [self.version - 1 - version] * len(updates), norm, tally)
                    tally = _Tally()
            self.schedule.fill(self.version)
            self._forget_unheld()

    def _out_of_time(self) -> bool:
        """The simulated duration is over (``federation.max_virtual_time``, 0: no limit)."""
        max_time = float(self.host.cfg.federation.max_virtual_time)
        return 0 < max_time <= self.schedule.now

    def _failed(self, tally: _Tally, partition_id: int, reason: str) -> None:
        """A client task that failed: named in the next row, and the run stops past the budget."""
        tally.failed[partition_id] = reason
        self.host.check_budget(self.version + 1, {partition_id: reason})
        tally.failures += 1
        if tally.failures > len(self.nodes):
            raise FederationError(
                f"version {self.version + 1}: {tally.failures} client tasks failed since the last aggregation "
                f"(more than the {len(self.nodes)} clients); last: client {partition_id}: "
                f"{reason}. Versions up to {self.version} are saved: continue with `fedvlm fit --resume`"
            )

    def _conclude(self, updates: Sequence[ClientUpdate], taus: Sequence[int], norm: float, tally: _Tally) -> None:
        """The new version's row (staleness, drops, traffic), evaluation and checkpoint."""
        host = self.host
        row: dict[str, Any] = {"round": self.version, **host.training_metrics(updates)}
        row.update(host.aggregator.round_metrics(self.version, self.buffer_size / len(self.nodes)))
        row.update(
            {
                "staleness_mean": sum(taus) / len(taus),
                "staleness_max": max(taus),
                "dropped_stale": tally.dropped_stale,
                "vanished": tally.vanished,
            }
        )
        host.progress.virtual_time = self.schedule.now
        traffic = RoundTraffic(tally.sent_bytes, tally.received_bytes)
        host.conclude(self.grid, self.nodes, row, traffic, tally.failed, tally.started, norm)  # checkpoints

    def weights(self, buffer: Sequence[tuple[Dispatch, ClientUpdate]]) -> list[float]:
        """α of the buffer's updates: Eq. 31 normalised within the buffer (:func:`buffer_weights`),
        or with ``weight_by_duration`` :func:`duration_weights` (``d`` the task's time on the clock)."""
        if not self.weight_by_duration:
            return buffer_weights([(u.num_examples, self.version - d.version) for d, u in buffer], self.staleness)
        timed = [
            (u.num_examples, (d.finish - d.start) / self.mean_duration, self.version - d.version) for d, u in buffer
        ]
        return duration_weights(timed, self.staleness)

    def _weighted_mean(self, buffer: Sequence[tuple[Dispatch, ClientUpdate]]) -> State:
        """``Σ_c α_c Δ_c`` over a full buffer (:meth:`weights`)."""
        mean_delta: State = {}
        for alpha, (_, update) in zip(self.weights(buffer), buffer, strict=True):
            for key, delta in update.state.items():
                mean_delta[key] = mean_delta.get(key, 0.0) + alpha * delta  # type: ignore[assignment, operator]
        return mean_delta

    def _step(self, mean_delta: State, updates: Sequence[ClientUpdate]) -> float:
        """One new version: the strategy's server step on the weighted mean change (as on the sum
        SecAgg+ reveals); returns the update's norm."""
        host = self.host
        bare = [ClientUpdate(u.partition_id, u.num_examples, {}, u.metrics) for u in updates]
        replies = RoundReplies(bare, {}, mean_delta=mean_delta)
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
]
