"""Buffered asynchronous aggregation and the virtual clock: hand-computed schedules and models."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fedvlm.config import load_config, save_config
from fedvlm.errors import ConfigError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate
from fedvlm.federation.asynchronous import AsyncRounds, AsyncSchedule
from fedvlm.federation.clock import VANISHED, LognormalSpeed, VirtualClock
from fedvlm.federation.codecs import IdentityCodec
from fedvlm.federation.exchange import RoundTraffic
from fedvlm.federation.secure import secure_aggregation_mod
from fedvlm.federation.server import FederatedServer, Progress
from fedvlm.federation.staleness import ExponentialStaleness, PolynomialStaleness, buffer_weights, duration_weights
from fedvlm.federation.strategies import FedAvg
from fedvlm.runs import RunLayout
from fedvlm.tasks import get_task
from tests.federation.conftest import InProcessGrid
from tests.federation.test_transport import _federation


def test_staleness_functions_match_their_formulas() -> None:
    exponential, polynomial = ExponentialStaleness(lam=0.3), PolynomialStaleness(a=0.7)
    for tau in range(6):
        assert exponential(tau) == pytest.approx(math.exp(-0.3 * tau))
        assert polynomial(tau) == pytest.approx((1 + tau) ** -0.7)
    # N_c · s(τ_c), normalised: 20·1, 10·e^(−0.3), 30·e^(−0.6)
    raw = [20.0, 10 * math.exp(-0.3), 30 * math.exp(-0.6)]
    assert buffer_weights([(20, 0), (10, 1), (30, 2)], exponential) == pytest.approx([w / sum(raw) for w in raw])
    # with durations: N·(d/d̄)·s(τ) over Σ N, not renormalised
    timed = duration_weights([(20, 0.5, 0), (10, 2.0, 1), (30, 1.0, 2)], exponential)
    assert timed == pytest.approx([20 * 0.5 / 60, 10 * 2 * math.exp(-0.3) / 60, 30 * math.exp(-0.6) / 60])


def test_lognormal_speeds_are_seeded_per_client_with_median_one() -> None:
    speeds = LognormalSpeed(sigma=1.0).factors(range(2000), seed=3)
    z = [math.log(speeds[pid]) for pid in range(2000)]
    assert np.mean(z) == pytest.approx(0.0, abs=0.07) and np.std(z) == pytest.approx(1.0, abs=0.05)
    # a client's draw does not depend on who else is registered, and the seed changes it
    assert LognormalSpeed(sigma=1.0).factors([7], seed=3) == {7: speeds[7]}
    assert LognormalSpeed(sigma=1.0).factors([7], seed=4) != {7: speeds[7]}
    assert LognormalSpeed(sigma=2.0).factors([7], seed=3)[7] == pytest.approx(speeds[7] ** 2)


def test_the_clock_vanishes_clients_at_the_dropout_rate_part_way_through_their_task() -> None:
    clock = VirtualClock({0: 2.0}, {0: 30}, local_epochs=2, dropout=0.25, seed=0)
    tasks = [clock.task(0, start=10.0, task_index=i) for i in range(4000)]
    vanished = [t for t in tasks if t.vanished]
    assert len(vanished) / len(tasks) == pytest.approx(0.25, abs=0.02)
    assert all(t.finish == 10.0 + 4.0 for t in tasks if not t.vanished)  # 2 · 2 epochs · 30/30
    assert all(10.0 <= t.finish < 14.0 for t in vanished)
    assert clock.task(0, 10.0, 17) == clock.task(0, 10.0, 17)  # seeded by (seed, task, client)


def test_the_schedule_keeps_the_clients_busy_and_replays_in_clock_order() -> None:
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 1, 1: 1, 2: 1}, 1, 0.0, 0)
    schedule = AsyncSchedule(clock, [0, 1, 2], concurrency=2, seed=5)
    first = schedule.fill(version=0)
    assert len(first) == 2 and len({d.partition_id for d in first}) == 2
    order = []
    for version in range(1, 20):
        dispatch = schedule.pop_next()
        order.append((dispatch.finish, dispatch.index))
        assert all(d.finish >= dispatch.finish for d in schedule.in_flight.values())
        schedule.fill(version)
        assert len(schedule.in_flight) == 2
        assert len({d.partition_id for d in schedule.in_flight.values()}) == 2  # a client works on one task
    assert order == sorted(order)
    # a schedule restored from its state continues identically
    restored = AsyncSchedule(clock, [0, 1, 2], concurrency=2, seed=5)
    restored.load_state_dict(schedule.state_dict())
    for version in range(20, 30):
        a, b = schedule.pop_next(), restored.pop_next()
        assert a == b
        assert schedule.fill(version) == restored.fill(version)


# -- the loop against a planted federation -------------------------------------------------

CLIENT_STEP = {0: 1.0, 1: 2.0, 2: 3.0}  # client c's update moves w by c + 1 from what it received


def _stepping_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.PARTITION_ID])
        w = message.content.array_records[keys.ARRAYS].to_torch_state_dict()["w"]
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord(torch_state_dict={"w": w + CLIENT_STEP[pid]}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.0, keys.TRAIN_SECONDS: 0.0}),
            }
        )
        return Message(content, reply_to=message)

    return app


class _Host:
    """The parts of the server the loop uses, with plain FedAvg and a one-entry model."""

    def __init__(self, clock: VirtualClock, rounds: int, buffer_size: int, lam: float) -> None:
        self.cfg = OmegaConf.create(
            {
                "seed": 0,
                "federation": {
                    "rounds": rounds,
                    "buffer_size": buffer_size,
                    "max_staleness": 10,
                    "weight_by_duration": False,
                    "max_virtual_time": 0.0,
                    "staleness": {"name": "exponential", "lam": lam},
                    "round_timeout": 5.0,
                    "clients_per_round": 0,
                },
            }
        )
        self.aggregator = FedAvg()
        self.codec = IdentityCodec()
        self.clock: VirtualClock | None = clock
        self.client_sizes = {0: 10, 1: 10, 2: 10}
        self.progress = Progress()
        self.async_state: Any = None
        self.global_state = {"w": torch.zeros(1, dtype=torch.float64)}
        self.versions: list[float] = []
        self.rows: list[dict[str, Any]] = []

    def round_config(self, server_round: int, task_index: int) -> dict[str, Any]:
        return {keys.SERVER_ROUND: server_round, keys.ROUND_SEED: task_index}

    def train_content(self, round_config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> RecordDict:
        return RecordDict(
            {keys.ARRAYS: ArrayRecord(torch_state_dict=state), keys.CONFIG: ConfigRecord(dict(round_config))}
        )

    def sent_state(self) -> dict[str, torch.Tensor]:
        return dict(self.global_state)

    def apply(self, aggregated: dict[str, torch.Tensor]) -> float:
        norm = float((aggregated["w"] - self.global_state["w"]).abs().sum())
        self.global_state = {"w": aggregated["w"].to(torch.float64)}
        return norm

    def training_metrics(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        return {"clients": sorted(u.partition_id for u in updates)}

    def check_budget(self, server_round: int, failed: Mapping[int, str]) -> None:
        pass

    def conclude(
        self,
        grid: Grid,
        nodes: Mapping[int, int],
        row: dict[str, Any],
        traffic: RoundTraffic,
        failed: Mapping[int, str],
        started: float,
        norm: float,
    ) -> None:
        row["virtual_time"] = self.progress.virtual_time
        self.rows.append({**row, "failed": dict(failed)})
        self.versions.append(float(self.global_state["w"]))
        self.progress.completed_round = int(row["round"])


def test_a_three_client_async_run_with_planted_speeds_makes_the_hand_computed_models() -> None:
    """Speeds 1, 2, 4 (equal data), buffer K = 2, s(τ) = e^(−τ·ln 2) = 2^−τ, client c steps c + 1.

    t=1: client 0 (τ 0) buffered; it restarts from version 0. t=2: client 1 (τ 0) fills the
    buffer: w₁ = 0 + (1 + 2)/2 = 1.5; client 1 restarts from version 1. Then client 0's second
    update, from version 0 (τ 1), is buffered; it restarts from version 1 and at t=3 (τ 0)
    fills the buffer: w₂ = 1.5 + (½·1 + 1·1)/1.5 = 2.5. At t=4 three tasks end; in dispatch order,
    client 2 (from version 0, τ 2, step 3) and client 1 (from version 1, τ 1, step 2):
    w₃ = 2.5 + (¼·3 + ½·2)/¾ = 4.8333…
    """
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 10, 1: 10, 2: 10}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=3, buffer_size=2, lam=math.log(2))
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    AsyncRounds(host, cast(Grid, grid), {pid: 100 + pid for pid in range(3)}, {}).run()  # type: ignore[arg-type]

    assert host.versions == pytest.approx([1.5, 2.5, 4.5 + 1 / 3])
    assert [r["virtual_time"] for r in host.rows] == [2.0, 3.0, 4.0]
    assert [r["clients"] for r in host.rows] == [[0, 1], [0, 0], [1, 2]]
    assert [(r["staleness_mean"], r["staleness_max"]) for r in host.rows] == [(0.0, 0), (0.5, 1), (1.5, 2)]
    assert all(r["dropped_stale"] == 0 and r["vanished"] == 0 for r in host.rows)


def test_weighting_by_duration_gives_slow_clients_the_weight_of_the_time_they_took() -> None:
    """As above, with α = (d/d̄)·2^−τ / K (equal data; d = 1, 2, 4, d̄ = 7/3), not renormalised:
    w₁ = (1·1 + 2·2)/(2d̄) = 15/14; w₂ = w₁ + (1·½·1 + 1·1·1)/(2d̄) = w₁ + 9/28;
    w₃ = w₂ + (4·¼·3 + 2·½·2)/(2d̄) = w₂ + 15/14."""
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 10, 1: 10, 2: 10}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=3, buffer_size=2, lam=math.log(2))
    host.cfg.federation.weight_by_duration = True
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    AsyncRounds(host, cast(Grid, grid), {pid: 100 + pid for pid in range(3)}, {}).run()  # type: ignore[arg-type]
    assert host.versions == pytest.approx([15 / 14, 15 / 14 + 9 / 28, 15 / 7 + 9 / 28])


def test_in_arrival_order_replies_are_taken_as_they_come_and_the_clock_reads_wall_seconds() -> None:
    """The deployment engine's order. The in-process grid answers at once, so replies come in
    dispatch order whatever the speeds: c0, c1 → w₁ = 1.5; c2 (τ 1), c0 (τ 1) → w₂ = 1.5 + 2;
    c1 (τ 1), c2 (τ 1) → w₃ = 3.5 + 2.5."""
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 10, 1: 10, 2: 10}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=3, buffer_size=2, lam=math.log(2))
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    nodes = {pid: 100 + pid for pid in range(3)}
    AsyncRounds(host, cast(Grid, grid), nodes, {}, arrival_order=True).run()  # type: ignore[arg-type]
    assert host.versions == pytest.approx([1.5, 3.5, 6.0])
    times = [r["virtual_time"] for r in host.rows]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 60  # wall seconds of this test


def test_max_virtual_time_ends_an_async_run_when_the_clock_passes_it() -> None:
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 10, 1: 10, 2: 10}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=100, buffer_size=2, lam=math.log(2))
    host.cfg.federation.max_virtual_time = 3.0
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    AsyncRounds(host, cast(Grid, grid), {pid: 100 + pid for pid in range(3)}, {}).run()  # type: ignore[arg-type]
    assert host.versions == pytest.approx([1.5, 2.5])  # versions at t = 2 and 3, then the clock is past 3


def test_updates_staler_than_max_staleness_are_dropped_and_counted() -> None:
    clock = VirtualClock({0: 1.0, 1: 2.0, 2: 4.0}, {0: 10, 1: 10, 2: 10}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=3, buffer_size=2, lam=math.log(2))
    host.cfg.federation.max_staleness = 1
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    AsyncRounds(host, cast(Grid, grid), {pid: 100 + pid for pid in range(3)}, {}).run()  # type: ignore[arg-type]
    # as above until t=4, where client 2's update (τ 2) is dropped; client 1 (τ 1) and client 0
    # (from version 2, τ 0) make version 3: 2.5 + (½·2 + 1·1)/1.5
    assert host.versions == pytest.approx([1.5, 2.5, 2.5 + 2 / 1.5])
    assert host.rows[2]["dropped_stale"] == 1 and host.rows[2]["clients"] == [0, 1]


def test_a_vanished_client_is_reported_and_given_work_again() -> None:
    clock = VirtualClock({0: 1.0, 1: 1.0}, {0: 10, 1: 10}, local_epochs=1, dropout=0.5, seed=1)
    host = _Host(clock, rounds=4, buffer_size=2, lam=0.0)
    grid = InProcessGrid(_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(2)})
    host.client_sizes = {0: 10, 1: 10}
    AsyncRounds(host, cast(Grid, grid), {0: 100, 1: 101}, {}).run()  # type: ignore[arg-type]
    vanished = sum(r["vanished"] for r in host.rows)
    assert vanished > 0
    assert all(why == VANISHED for r in host.rows for why in r["failed"].values())
    trained = [m for m in grid.sent if m.metadata.message_type == keys.TRAIN]
    assert len(trained) >= 4 * 2  # vanished tasks send nothing; every version still has K = 2 updates


# -- the real server ------------------------------------------------------------------------

ASYNC = (
    "federation.mode=async",
    "federation.buffer_size=2",
    "federation.client_speed={name: lognormal, sigma: 1.0}",
    "federation.dropout=0.2",
    "federation.rounds=4",
)


def test_async_rows_carry_the_clock_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, grid = _federation(tmp_path / "a", "leukemia_demo", *ASYNC)
    straight.run(cast(Grid, grid))
    rows = straight.progress.history
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    times = [r["virtual_time"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert all(r["num_clients"] == 2 for r in rows)
    assert max(r["staleness_max"] for r in rows) >= 1  # slow clients' updates arrive stale
    assert "test/accuracy" in rows[-1] and rows[-1]["evaluated_clients"] == 3

    class Interrupted(Exception):
        pass

    def stop_after_two(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise Interrupted

    broken, grid = _federation(tmp_path / "b", "leukemia_demo", *ASYNC)
    broken.report = stop_after_two
    with pytest.raises(Interrupted):
        broken.run(cast(Grid, grid))
    cfg = load_config(RunLayout(broken.run_dir).config)
    resumed = FederatedServer(cfg, broken.run_dir, get_task(cfg.task), resume=True)
    resumed.run(cast(Grid, grid))
    assert [r["virtual_time"] for r in resumed.progress.history] == times
    for key, value in straight.global_state.items():
        torch.testing.assert_close(resumed.global_state[key], value, rtol=0, atol=0)


def test_a_sync_round_lasts_as_long_as_its_slowest_client(tmp_path: Path) -> None:
    server, grid = _federation(
        tmp_path, "leukemia_demo", "federation.rounds=2", "federation.client_speed={name: lognormal, sigma: 1.0}"
    )
    server.run(cast(Grid, grid))
    clock = server.clock
    assert clock is not None
    slowest = max(clock.duration(pid) for pid in range(3))  # every client trains every round
    times = [r["virtual_time"] for r in server.progress.history]
    assert times == pytest.approx([slowest, 2 * slowest])
    speeds = LognormalSpeed(1.0).factors(range(3), seed=int(server.cfg.seed))
    sizes = server.client_sizes
    epochs = int(server.cfg.trainer.local_epochs)
    assert slowest == pytest.approx(max(speeds[p] * epochs * sizes[p] / (sum(sizes.values()) / 3) for p in range(3)))
    assert all(r["staleness_max"] == 0 and r["dropped_stale"] == 0 for r in server.progress.history)
    # each client-round's timings nest: the whole message ⊃ local training ⊃ the training steps
    for row in server.progress.history:
        for timings in row["clients"].values():
            assert timings["client_seconds"] >= timings["train_seconds"] > timings["step_seconds"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.strategy=median"], "mode=async needs a linear strategy"),
        (["federation.secure_aggregation.enabled=true", "federation.buffer_size=2"], "needs at least 3 clients"),
        (
            ["federation.secure_aggregation.enabled=true", "federation.weight_by_duration=true"],
            "weight_by_duration weighs each update",
        ),
        (
            ["federation.secure_aggregation.enabled=true", "federation.buffer_size=4", "federation.num_clients=3"],
            "3 clients at work",
        ),
        (["privacy.central.clipping=client", "privacy.central.noise_multiplier=1.0"], "central.clipping does not"),
        (["federation.buffer_size=0"], "buffer_size=0 must be >= 1"),
        (["federation.dropout=1.0"], r"dropout=1.0 must be in \[0, 1\)"),
        (["federation.staleness={name: exponential, lam: -1}"], "lam=-1.0 must be >= 0"),
        (["federation.staleness=linear"], "unknown staleness function 'linear'"),
    ],
)
def test_async_settings_fail_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises((ConfigError, KeyError), match=message):
        load_config("leukemia_demo", ["federation.mode=async", *overrides])


def test_a_saved_async_config_loads_again(tmp_path: Path) -> None:
    cfg = load_config("leukemia_demo", list(ASYNC))
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert dict(again.federation.staleness) == {"name": "exponential", "lam": 0.5}
    assert dict(again.federation.client_speed) == {"name": "lognormal", "sigma": 1.0}


# -- SecAgg+ over each buffer --------------------------------------------------------------


def _secure_stepping_app() -> ClientApp:
    """:func:`_stepping_app` behind the SecAgg+ client mod (client c steps c + 1, 10 examples)."""
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.PARTITION_ID])
        w = message.content.array_records[keys.ARRAYS].to_torch_state_dict()["w"]
        content = RecordDict(
            {
                keys.ARRAYS: ArrayRecord(torch_state_dict={"w": w + pid + 1}),
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.0, keys.TRAIN_SECONDS: 0.0}),
            }
        )
        return Message(content, reply_to=message)

    return app


def _secure_host(durations: Mapping[int, float], rounds: int, buffer_size: int, lam: float) -> _Host:
    clock = VirtualClock(dict(durations), {pid: 10 for pid in durations}, local_epochs=1, dropout=0.0, seed=0)
    host = _Host(clock, rounds=rounds, buffer_size=buffer_size, lam=lam)
    host.client_sizes = {pid: 10 for pid in durations}
    secure = {
        "enabled": True,
        "clipping_range": 8.0,
        "quantization_range": 2**22,
        "max_weight": None,
        "num_shares": 1.0,
        "reconstruction_threshold": 0.5,
    }
    host.cfg.federation.secure_aggregation = secure
    return host


def test_secure_async_sums_cohorts_and_weighs_each_by_its_staleness() -> None:
    """Six clients of durations 1–6 (equal data), K = 3, s(τ) = 2^−τ, client c steps c + 1.

    The seeded choice makes cohorts A = {1, 3, 4} (ends t = 5) and B = {0, 2, 5} (ends t = 6), each
    sent again, whole, when it ends (the only idle clients then are its own). The server sees each
    cohort's mean step only: A's is 11/3, B's 10/3.
    t=5: A from v0 (τ 0): w₁ = 11/3. t=6: B from v0 (τ 1): w₂ = w₁ + ½·10/3 = 16/3.
    t=10: A from v1 (τ 1): w₃ = w₂ + ½·11/3 = 43/6. t=12: B from v2 (τ 1): w₄ = w₃ + ½·10/3 = 53/6.
    """
    durations = {pid: float(pid + 1) for pid in range(6)}
    host = _secure_host(durations, rounds=4, buffer_size=3, lam=math.log(2))
    grid = InProcessGrid(_secure_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in durations})
    AsyncRounds(host, cast(Grid, grid), {pid: 100 + pid for pid in durations}, {}).run()  # type: ignore[arg-type]

    assert [r["clients"] for r in host.rows] == [[1, 3, 4], [0, 2, 5], [1, 3, 4], [0, 2, 5]]
    assert [r["virtual_time"] for r in host.rows] == [5.0, 6.0, 10.0, 12.0]
    assert [r["staleness_max"] for r in host.rows] == [0, 1, 1, 1]
    assert host.versions == pytest.approx([11 / 3, 16 / 3, 43 / 6, 53 / 6], abs=1e-4)  # SecAgg+ quantises
    # every message went out inside the protocol (none pushed on its own, whose reply the server would read)
    assert grid.pending == {} and all(RECORD_KEY_CONFIGS in m.content.config_records for m in grid.sent)


def test_secure_async_is_refused_on_the_deployment_engine() -> None:
    host = _secure_host({pid: 1.0 for pid in range(3)}, rounds=1, buffer_size=3, lam=0.0)
    grid = InProcessGrid(_secure_stepping_app(), {100 + pid: {keys.PARTITION_ID: pid} for pid in range(3)})
    with pytest.raises(ConfigError, match="runs in simulation only"):
        AsyncRounds(host, cast(Grid, grid), {p: 100 + p for p in range(3)}, {}, arrival_order=True)  # type: ignore[arg-type]


def test_a_secure_async_federation_sends_no_update_in_the_clear_and_resumes(tmp_path: Path) -> None:
    secure = (*ASYNC, "federation.buffer_size=3", "federation.secure_aggregation.enabled=true", "federation.rounds=2")
    straight, grid = _federation(tmp_path / "a", "leukemia_demo", *secure)
    straight.run(cast(Grid, grid))
    rows = straight.progress.history
    assert [r["round"] for r in rows] == [1, 2]
    # one cohort of the 3 clients at a time: never stale; a cohort with one survivor unmasks nothing
    assert all(2 <= r["num_clients"] <= 3 and r["staleness_max"] == 0 for r in rows)
    assert all(keys.ARRAYS not in m.content.array_records for m in grid.received if not m.has_error())
    assert "test/accuracy" in rows[-1]

    class Interrupted(Exception):
        pass

    def stop_after_one(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise Interrupted

    broken, grid = _federation(tmp_path / "b", "leukemia_demo", *secure)
    broken.report = stop_after_one
    with pytest.raises(Interrupted):
        broken.run(cast(Grid, grid))
    cfg = load_config(RunLayout(broken.run_dir).config)
    resumed = FederatedServer(cfg, broken.run_dir, get_task(cfg.task), resume=True)
    resumed.run(cast(Grid, grid))
    assert [r["virtual_time"] for r in resumed.progress.history] == [r["virtual_time"] for r in rows]
    for key, value in straight.global_state.items():  # SecAgg+'s stochastic rounding differs between runs
        torch.testing.assert_close(resumed.global_state[key], value, rtol=0, atol=1e-3)
