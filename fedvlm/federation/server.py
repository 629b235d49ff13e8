"""The server's round loop, run inside a Flower ``ServerApp`` on any ``Grid``.

One round (Fed-MMX Algorithm 1 / FedVLM Algorithm 1):

1. sample clients (seeded by ``(seed, round)``, so a resumed run samples the same ones);
2. send the global weights and the round config (lr, μ, encoder freeze, seed);
3. receive replies; a client that raised or did not answer within ``round_timeout`` is reported
   and left out; fewer than ``min_clients`` answers stop the run (progress is kept);
4. decode (update codec) and aggregate (strategy) in partition order, so the result does not
   depend on the order in which replies arrived;
5. evaluate the new global model on every site's local validation and test splits, pooled by
   **merging metric state** (counts), never by averaging per-site numbers; per-site values too;
6. write ``checkpoints/last.ckpt`` (+ ``best.ckpt``) and ``metrics.jsonl``; stop early when
   ``‖θ(t+1) − θ(t)‖₂ < ε`` (Eq. 6).

Flower's ``Strategy.start()`` has no resume and counts rounds from 1, hence this loop.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedvlm.data.prepared import make_loader
from fedvlm.errors import FederationError, PrivacyBudgetExhausted
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate
from fedvlm.federation.asynchronous import AsyncRounds
from fedvlm.federation.callback import load_global_state, static_fingerprint, travelling_keys
from fedvlm.federation.clock import VANISHED, VirtualClock, build_clock
from fedvlm.federation.codecs import update_codecs
from fedvlm.federation.evaluation import evaluate_on_clients, scalar_values
from fedvlm.federation.exchange import RoundExchange, RoundTraffic
from fedvlm.federation.messages import error_reason
from fedvlm.federation.pipeline import build_aggregator
from fedvlm.federation.sampling import sample_clients
from fedvlm.federation.secure import CLIPPED_FRACTION
from fedvlm.runs import (
    RunLayout,
    load_checkpoint,
    save_checkpoint,
    write_metrics,
    write_partition_summary,
)
from fedvlm.tasks import Task
from fedvlm.tasks.base import selection_key

State = dict[str, torch.Tensor]
STRATEGY_STATE = "strategy_state"
"""Checkpoint entry (under ``"fedvlm"``) holding what the strategy carries across rounds."""
ASYNC_STATE = "async_state"
"""Checkpoint entry (under ``"fedvlm"``) of the asynchronous loop: clients at work, their versions."""
TIMINGS = {"step_seconds": keys.STEP_SECONDS, "client_seconds": keys.CLIENT_SECONDS}
"""Per-client timings of a row (``clients``), beside ``train_seconds``: the fixed cost is the rest."""
RoundReporter = Callable[[dict[str, Any]], None]


@dataclass
class Progress:
    """What a checkpoint must hold to continue a federation exactly where it stopped."""

    completed_round: int = 0
    best_value: float = -math.inf
    best_round: int = 0
    converged: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    virtual_time: float = 0.0
    """The virtual clock (:mod:`fedvlm.federation.clock`) when the last completed round ended."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "completed_round": self.completed_round,
            "best_value": self.best_value,
            "best_round": self.best_round,
            "converged": self.converged,
            "history": self.history,
            "virtual_time": self.virtual_time,
        }


NODE_POLL_SECONDS = 1.0
"""How often :func:`wait_for_nodes` asks the SuperLink for connected nodes."""
NODE_WAIT_SECONDS = 120.0
"""How long the server waits for the run's SuperNodes before asking them for their sites."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Wait until ``expected`` SuperNodes are connected (they may start after the run).

    Raises:
        FederationError: If fewer are connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() >= deadline:
            raise FederationError(
                f"{len(node_ids)} SuperNodes connected after {timeout:g}s, {expected} expected "
                "(federation.num_clients); check that every site's flower-supernode is running"
            )
        time.sleep(NODE_POLL_SECONDS)


def learning_rate(cfg: DictConfig, server_round: int) -> float:
    """The round's learning rate: constant, or decaying linearly from ``lr`` over the rounds.

    Example:
        >>> from fedvlm.config import load_config
        >>> cfg = load_config(None, ["optim.lr=0.1", "federation.rounds=5"])
        >>> [round(learning_rate(cfg, r), 3) for r in range(1, 6)]
        [0.1, 0.08, 0.06, 0.04, 0.02]
    """
    if cfg.optim.lr_schedule == "constant":
        return float(cfg.optim.lr)
    fraction = 1.0 - (server_round - 1) / cfg.federation.rounds
    return float(cfg.optim.lr) * max(fraction, float(cfg.optim.min_lr_fraction))


def evaluation_device(cfg: DictConfig) -> torch.device:
    """Where the server evaluates: the first GPU when the recipe trains on GPUs and one exists."""
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def update_norm(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """``‖θ(t+1) − θ(t)‖₂`` over the floating-point entries (Eq. 6 of Fed-MMX)."""
    total = 0.0
    for key, value in new.items():
        if value.is_floating_point():
            total += float((value.double() - old[key].double()).pow(2).sum())
    return math.sqrt(total)


class FederatedServer:
    """Runs the rounds of one run directory on a Flower ``Grid``.

    Args:
        cfg: The run's resolved config.
        run_dir: The prepared run directory (``Task.prepare`` done).
        task: The task (data, model, metrics).
        resume: Continue from ``checkpoints/last.ckpt`` instead of starting at round 1.
        report: Called with each round's metrics row (console display).
        arrival_order: ``mode=async``: take replies as they arrive (deployment) instead of in
            the virtual clock's order (simulation; :class:`~fedvlm.federation.asynchronous.AsyncRounds`).
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        task: Task,
        resume: bool = False,
        report: RoundReporter | None = None,
        arrival_order: bool = False,
    ) -> None:
        self.cfg = cfg
        self.arrival_order = arrival_order
        self.run_dir = run_dir
        self.task = task
        self.report = report or (lambda row: None)
        self.aggregator = build_aggregator(cfg)  # strategy, wrapped by secure aggregation / central DP
        self.codec = update_codecs.build(cfg.federation.codec)
        L.seed_everything(int(cfg.seed), verbose=False)  # the initial global model follows the seed
        self.module = task.build_module(cfg, run_dir).to(evaluation_device(cfg))
        self.selection_key = selection_key(task, cfg)
        self.server_test = task.open_server_test(cfg, run_dir)  # a public set the coordinator may hold
        self.site_names: dict[int, str] = {}  # partition id → site name, as each client reports
        self.progress = Progress()
        self.global_state: State = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        # What can ever change: parameters trainable at construction and float buffers. Weights
        # frozen for the whole run (backbones in adapter mode) are never sent; clients build them
        # identically and check the fingerprint.
        self.downlink_keys = travelling_keys(self.module)
        # running statistics travel exactly under a lossy codec (a compressed delta of a variance can go negative)
        buffers = {name for name, buf in self.module.named_buffers() if buf.is_floating_point()}
        self.exact_keys = sorted(buffers & self.downlink_keys) if hasattr(self.codec, "exact") else []
        if cfg.privacy.dp:  # fail before round 1 when the model has layers DP-SGD cannot train
            from fedvlm.privacy import check_private_trainable

            check_private_trainable(self.module)
        self.static_fingerprint = static_fingerprint(self.module, self.downlink_keys)
        self.client_sizes: dict[int, int] = {}  # partition id → training examples, as each client reports
        self.clock: VirtualClock | None = None  # built once the clients have reported their sizes
        self.async_state: Callable[[], dict[str, Any]] | None = None  # the async loop's, saved with each version
        self.restored_async: dict[str, Any] = {}  # what a resumed async run continues from
        if resume:
            self._restore()

    def run(self, grid: Grid) -> Progress:
        """Run the remaining rounds; returns the final progress.

        Raises:
            FederationError: When fewer than ``min_clients`` clients answer a round (the last
                completed round stays on disk, so ``fedvlm fit --resume`` continues from it).
        """
        nodes = self._discover(grid)
        federation = self.cfg.federation
        excluded = set(federation.exclude_clients)
        nodes = {pid: node for pid, node in nodes.items() if pid not in excluded}
        if not nodes:
            raise FederationError(f"federation.exclude_clients={sorted(excluded)} leaves no client to train")
        sizes = {pid: self.client_sizes[pid] for pid in nodes}
        self.clock = build_clock(federation, sizes, int(self.cfg.trainer.local_epochs), int(self.cfg.seed))
        if federation.mode == "async":
            AsyncRounds(self, grid, nodes, self.restored_async, self.arrival_order).run()
            return self.progress
        max_time = float(federation.max_virtual_time)
        for server_round in range(self.progress.completed_round + 1, federation.rounds + 1):
            if self.progress.converged or 0 < max_time <= self.progress.virtual_time:
                break
            self._round(grid, nodes, server_round)
        return self.progress

    # -- one round -------------------------------------------------------------------------

    def round_config(self, server_round: int, task_index: int) -> dict[str, Any]:
        """The config of clients training towards global version ``server_round``.

        ``task_index`` (the round, or in async mode the dispatch) seeds the client's training.
        """
        federation = self.cfg.federation
        return {
            keys.SERVER_ROUND: server_round,
            keys.LEARNING_RATE: learning_rate(self.cfg, server_round),
            keys.FREEZE_ENCODERS: server_round <= federation.freeze_encoders_rounds,
            keys.LOCAL_EPOCHS: int(self.cfg.trainer.local_epochs),
            keys.ROUND_SEED: int(self.cfg.seed) * 100_003 + task_index * 1_009,
            keys.UPDATE_CODEC: json.dumps(dict(federation.codec)),
            **({keys.EXACT_KEYS: json.dumps(self.exact_keys)} if self.exact_keys else {}),
            keys.STATIC_FINGERPRINT: self.static_fingerprint,
            **self.aggregator.configure_round(server_round),
        }

    def train_content(self, round_config: Mapping[str, Any], state: State) -> RecordDict:
        """A train message's content: ``state`` (global weights that travel) and the round config."""
        return RecordDict(
            {keys.ARRAYS: ArrayRecord(torch_state_dict=state), keys.CONFIG: ConfigRecord(dict(round_config))}
        )

    def sent_state(self) -> State:
        """The global values clients receive (the downlink keys): what their updates start from."""
        return {k: v for k, v in self.global_state.items() if k in self.downlink_keys}

    def apply(self, aggregated: State) -> float:
        """Make the aggregate (after the aggregator's server update) the global state; returns its norm."""
        previous = self.global_state
        aggregated = self.aggregator.server_update(previous, aggregated)  # e.g. FedAvgM's server momentum
        self.global_state = {**previous, **{k: v.to(previous[k].dtype) for k, v in aggregated.items()}}
        return update_norm(previous, self.global_state)

    def _round(self, grid: Grid, nodes: Mapping[int, int], server_round: int) -> None:
        federation = self.cfg.federation
        started = time.perf_counter()
        sampled = sample_clients(list(nodes), federation.clients_per_round, self.cfg.seed, server_round)
        assert self.clock is not None, "run() builds the clock before the first round"
        tasks = {pid: self.clock.task(pid, self.progress.virtual_time, server_round) for pid in sampled}
        round_config = self.round_config(server_round, server_round)
        sent = self.sent_state()  # one content per client: wrappers (SecAgg+) add to each
        contents = {pid: self.train_content(round_config, sent) for pid in sampled if not tasks[pid].vanished}
        round_exchange = RoundExchange(
            grid, nodes, self.sent_state(), self.client_sizes, float(federation.round_timeout), self.codec
        )
        replies = self.aggregator.collect(round_exchange, contents, server_round)
        failed = {**replies.failed, **{pid: VANISHED for pid, task in tasks.items() if task.vanished}}
        self._check_answers(server_round, replies.answered, len(sampled), len(nodes), failed)
        norm = self.apply(self.aggregator.aggregate(replies, self.global_state))  # the one aggregation call
        row: dict[str, Any] = {"round": server_round, **self.training_metrics(replies.updates)}
        row.update(self.aggregator.round_metrics(server_round, len(sampled) / len(nodes)))  # e.g. central DP's ε
        # A synchronous round lasts until its slowest client replies (or its last vanished one is noticed).
        self.progress.virtual_time = max((task.finish for task in tasks.values()), default=self.progress.virtual_time)
        row.update({"staleness_mean": 0.0, "staleness_max": 0, "dropped_stale": 0})
        self.conclude(grid, nodes, row, RoundTraffic(replies.bytes_sent, replies.bytes_received), failed, started, norm)

    def training_metrics(self, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """The row entries of the updates: mean train loss, per-client values, shared aggregates, ε."""
        row: dict[str, Any] = {}
        total_examples = sum(u.num_examples for u in updates)
        row["train/loss"] = sum(u.num_examples * float(u.metrics[keys.TRAIN_LOSS]) for u in updates) / total_examples
        clients: dict[str, dict[str, Any]] = {}
        for u in updates:  # a client may appear twice in an asynchronous buffer: its last update speaks
            clients[str(u.partition_id)] = {
                "num_examples": u.num_examples,
                "train/loss": float(u.metrics[keys.TRAIN_LOSS]),
                "train_seconds": float(u.metrics[keys.TRAIN_SECONDS]),
                **{name: float(u.metrics[key]) for name, key in TIMINGS.items() if key in u.metrics},
            }
        # Aggregates a client chose to share (explanation quality): per client, and their mean.
        shared = sorted({k for u in updates for k in u.metrics if k.startswith(keys.SHARED_PREFIX)})
        for key in shared:
            shared_values = [float(u.metrics[key]) for u in updates if key in u.metrics]
            for u in updates:
                if key in u.metrics:
                    clients[str(u.partition_id)][key] = float(u.metrics[key])
            row[key] = self.task.reduce_shared(key, shared_values)  # the task knows how its aggregates combine
        epsilons = {str(u.partition_id): float(u.metrics[keys.EPSILON]) for u in updates if keys.EPSILON in u.metrics}
        for pid_key, epsilon in epsilons.items():  # cumulative DP-SGD ε per client (privacy.dp)
            clients[pid_key][keys.EPSILON] = epsilon
        if epsilons:
            row[keys.EPSILON_MAX] = max(epsilons.values())
        clipped = [float(u.metrics[CLIPPED_FRACTION]) for u in updates if CLIPPED_FRACTION in u.metrics]
        if clipped:  # coordinates SecAgg+ had to clip to ±clipping_range: should stay ~0
            row[f"{CLIPPED_FRACTION}_max"] = max(clipped)
        row["num_clients"] = len(updates)
        row["clients"] = clients
        return row

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
        """Finish the row of global version ``row["round"]``: evaluate when due, record, checkpoint."""
        federation = self.cfg.federation
        server_round = int(row["round"])
        bytes_sent, bytes_received = traffic.sent, traffic.received
        last = server_round == federation.rounds
        if last or (federation.evaluate_clients and server_round % int(federation.evaluate_every) == 0):
            evaluated = sample_clients(  # seeded apart from the training sample (seed·7 + 1)
                list(nodes),
                0 if last else int(federation.evaluate_clients_per_round),
                int(self.cfg.seed) * 7 + 1,
                server_round,
            )
            row["evaluated_clients"] = len(evaluated)
            evaluation = evaluate_on_clients(
                grid,
                {pid: nodes[pid] for pid in evaluated},
                self._downlink(),
                self.static_fingerprint,
                self.task,
                self.cfg,
                self.site_names,
            )
            bytes_sent += evaluation.bytes_sent
            bytes_received += evaluation.bytes_received
            row["failed_evaluations"] = {str(pid): why for pid, why in sorted(evaluation.failed.items())}
            row.update(evaluation.pooled)
            for pid, values in evaluation.per_client.items():
                row["clients"].setdefault(str(pid), {}).update(values)
                site = self.site_names.get(pid, str(pid))
                row.update({f"test/site/{site}/{k[5:]}": v for k, v in values.items() if k.startswith("test/")})
            row.update(self._evaluate_server_test())
        row.update(
            {
                "round_seconds": time.perf_counter() - started,
                "virtual_time": self.progress.virtual_time,
                "bytes_sent": bytes_sent,
                "bytes_received": bytes_received,
                "uplink_bytes": traffic.received,  # the train exchange's replies: the updates
                "update_norm": norm,
                "lr": learning_rate(self.cfg, server_round),
                "encoders_frozen": server_round <= federation.freeze_encoders_rounds,
                "failed_clients": {str(pid): why for pid, why in sorted(failed.items())},
            }
        )
        self._complete(server_round, row, norm)

    def _check_answers(
        self, server_round: int, answered: int, asked: int, available: int, failed: Mapping[int, str]
    ) -> None:
        """Stop the run (keeping every completed round) on an exhausted privacy budget or too few answers."""
        self.check_budget(server_round, failed)
        federation = self.cfg.federation
        if answered < min(int(federation.min_clients), available):
            reasons = "; ".join(f"client {pid}: {why}" for pid, why in sorted(failed.items()))
            raise FederationError(
                f"round {server_round}: only {answered} of {asked} clients answered "
                f"(federation.min_clients={federation.min_clients}); {reasons}. Rounds up to "
                f"{self.progress.completed_round} are saved: continue with `fedvlm fit --resume {self.run_dir}`"
            )

    def check_budget(self, server_round: int, failed: Mapping[int, str]) -> None:
        """Stop the run when a client's DP-SGD budget is exhausted: going on would train without it.

        Raises:
            FederationError: Naming each such client; completed rounds stay on disk.
        """
        exhausted = {pid: why for pid, why in failed.items() if PrivacyBudgetExhausted.raised_in(why)}
        if exhausted:
            raise FederationError(
                f"round {server_round}: stopped, {PrivacyBudgetExhausted.MARKER} (privacy.max_epsilon="
                f"{self.cfg.privacy.max_epsilon}): "
                + "; ".join(f"client {pid}: {why}" for pid, why in sorted(exhausted.items()))
                + f". Rounds up to {self.progress.completed_round} are kept in {self.run_dir}"
            )

    def _downlink(self) -> ArrayRecord:
        return ArrayRecord(torch_state_dict=self.sent_state())

    def _evaluate_server_test(self) -> dict[str, float]:
        """``server_test/*``: the global model on the coordinator's own test set (exact metrics)."""
        if self.server_test is None:
            return {}
        load_global_state(self.module, self.global_state)
        metrics = self.task.make_metrics(self.cfg, mergeable=False)
        loader = make_loader(self.server_test.test, int(self.cfg.trainer.batch_size), shuffle=False)
        self.task.evaluate(self.module, loader, metrics)
        values = scalar_values(self.task, metrics, "server_test", "the coordinator")
        return {f"server_test/{key}": value for key, value in values.items()}

    # -- bookkeeping -----------------------------------------------------------------------

    def _complete(self, server_round: int, row: dict[str, Any], norm: float) -> None:
        progress = self.progress
        progress.completed_round = server_round
        progress.history.append(row)
        tolerance = float(self.cfg.federation.convergence_tol)
        progress.converged = tolerance > 0 and norm < tolerance
        row["converged"] = progress.converged
        run = RunLayout(self.run_dir)
        value = row.get(self.selection_key)
        value = -math.inf if value is None or math.isnan(float(value)) else float(value)
        improved = value > progress.best_value
        if improved:
            progress.best_value, progress.best_round = value, server_round
        hparams = dict(self.module.hparams)
        resumable = {**progress.as_dict(), STRATEGY_STATE: self.aggregator.state_dict()}
        if self.async_state is not None:
            resumable[ASYNC_STATE] = self.async_state()
        save_checkpoint(run.checkpoint("last"), self.global_state, hparams, resumable)
        if improved:
            save_checkpoint(run.checkpoint("best"), self.global_state, hparams, resumable)
        write_metrics(self.run_dir, progress.history)
        self.report(row)

    def _restore(self) -> None:
        path = RunLayout(self.run_dir).checkpoint("last")
        if not path.is_file():
            return  # no round was completed: start from round 1 on the prepared data
        checkpoint = load_checkpoint(path)
        saved = dict(checkpoint["fedvlm"])
        self.aggregator.load_state_dict(saved.pop(STRATEGY_STATE, {}))  # e.g. FedAvgM's momentum
        self.restored_async = saved.pop(ASYNC_STATE, {})  # the clients at work, the model versions they hold
        self.progress = Progress(**saved)
        # Convergence is judged with the tolerance in force now (a resume may relax it).
        tolerance = float(self.cfg.federation.convergence_tol)
        last_norm = self.progress.history[-1]["update_norm"] if self.progress.history else math.inf
        self.progress.converged = tolerance > 0 and last_norm < tolerance
        missing = set(self.global_state) - set(checkpoint["state_dict"])
        if missing:
            raise FederationError(f"cannot resume: {path} lacks weights {sorted(missing)[:5]}")
        self.global_state = {k: v.to(self.global_state[k].dtype) for k, v in checkpoint["state_dict"].items()}
        write_metrics(self.run_dir, self.progress.history)

    def _discover(self, grid: Grid) -> dict[int, int]:
        """Map partition id → node id by asking every node (node ids differ between runs)."""
        expected = 1 if self.cfg.federation.mode == "centralized" else int(self.cfg.federation.num_clients)
        # Simulated SuperNodes register while the ServerApp starts: on a loaded machine, after it.
        node_ids = wait_for_nodes(grid, expected, min(float(self.cfg.federation.round_timeout), NODE_WAIT_SECONDS))
        messages = [
            Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type=keys.QUERY)
            for node in node_ids
        ]
        nodes: dict[int, int] = {}
        counts: dict[int, dict[str, Any]] = {}
        for reply in grid.send_and_receive(messages, timeout=float(self.cfg.federation.round_timeout)):
            if reply.has_error():  # e.g. a site's data failed validation: its error names the site and file
                raise FederationError(f"node {reply.metadata.src_node_id} failed to start: {error_reason(reply)}")
            pid = int(reply.content.metric_records[keys.METRICS][keys.PARTITION_ID])  # type: ignore[arg-type]
            if pid in nodes:
                raise FederationError(f"two SuperNodes claim partition {pid}")
            nodes[pid] = reply.metadata.src_node_id
            self.client_sizes[pid] = int(reply.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])  # type: ignore[arg-type]
            counts[pid] = json.loads(str(reply.content.config_records[keys.CONFIG][keys.SITE_COUNTS]))
            self.site_names[pid] = str(counts[pid]["site"])
        if len(nodes) < expected:
            raise FederationError(f"{len(nodes)} SuperNodes answered, {expected} expected")
        names = [self.site_names[pid] for pid in sorted(nodes)]
        if len(set(names)) < len(names):
            raise FederationError(f"two SuperNodes name the same site: {sorted(names)}")
        if self.cfg.evaluation.select_on == "val" and not any(c["val"] for c in counts.values()):
            raise FederationError(
                "no site has a validation split to select best.ckpt on: set data.val_fraction > 0 or "
                "evaluation.select_on=test (optimistic: the test split then chooses the model)"
            )
        write_partition_summary(self.run_dir, counts)
        return nodes
