"""The Flower ClientApp: local training and evaluation of one site's data.

Each message is handled with what the site has on disk (its own data, prepared in this process
the first time: :mod:`fedvlm.tasks.site`) and the config the server sends; the LightningModule
is trained by a per-round ``lightning.Trainer`` with
:class:`~fedvlm.federation.callback.FederatedRoundCallback` attached. Only weights and scalar
metrics, sample counts or sum-reduced metric counts leave the site.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedvlm.config import load_config
from fedvlm.errors import FederationError
from fedvlm.evaluation.metrics import export_state
from fedvlm.federation import keys
from fedvlm.federation.callback import (
    FederatedRoundCallback,
    FreezeModules,
    RoundLearningRate,
    StepTimer,
    load_global_state,
    non_finite_keys,
    static_fingerprint,
    travelling_keys,
)
from fedvlm.federation.codecs import encode_update, update_codecs
from fedvlm.federation.sampling import planned_rounds
from fedvlm.federation.secure import secure_aggregation_mod
from fedvlm.models.frozen import attach_embedding_cache
from fedvlm.runs import RunLayout
from fedvlm.tasks import Task, get_task
from fedvlm.tasks.site_store import SiteData

if TYPE_CHECKING:
    from fedvlm.privacy import PrivateTraining

for _name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@cache
def _run_config(run_dir: str) -> DictConfig:
    return load_config(RunLayout(Path(run_dir)).config)


def site_data(run_dir: str, partition_id: int, node_config: Mapping[str, Any] | None = None) -> SiteData:
    """This client's own data, prepared from its own source on first use; the process keeps the
    last site it served (only one)."""
    named = tuple(sorted((str(k), str(v)) for k, v in (node_config or {}).items()))
    return _site_data(run_dir, partition_id, named)


@lru_cache(maxsize=1)
def _site_data(run_dir: str, partition_id: int, node_config: tuple[tuple[str, str], ...]) -> SiteData:
    # One site at a time: in simulation a Ray actor serves several clients one after another, and
    # keeps only the site it serves now (its images stream from disk, so re-opening is cheap).
    cfg = _run_config(run_dir)
    return get_task(cfg.task).open_site(cfg, Path(run_dir), partition_id, dict(node_config))


def make_trainer(cfg: DictConfig, callbacks: list[L.Callback], max_epochs: int) -> L.Trainer:
    """A quiet ``lightning.Trainer`` with the recipe's accelerator/devices/strategy/precision."""
    trainer_cfg = cfg.trainer
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        deterministic=trainer_cfg.deterministic,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def train_locally(
    task: Task,
    cfg: DictConfig,
    run_dir: Path,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    round_config: dict[str, Any],
    site: SiteData,
) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """One client's round on its ``site`` data: load global weights, train ``local-epochs``,
    return the local state.

    Returns:
        ``(local_state, num_examples, metrics)``: the travelling keys after training, the number
        of local training examples, and scalar metrics (``train-loss``, ``train-seconds``).
    """
    started = time.perf_counter()
    module = build_global_module(task, cfg, run_dir, global_state, str(round_config.get(keys.STATIC_FINGERPRINT, "")))
    attach_embedding_cache(module, site.embedding_cache)  # frozen towers embed each record once per process
    round_seed = int(round_config[keys.ROUND_SEED]) + partition_id
    L.seed_everything(round_seed, workers=True, verbose=False)
    # Under DP the FedProx term is a pull after each step: a gradient term would be clipped and noised away.
    callback = FederatedRoundCallback(
        global_state, float(round_config.get(keys.PROXIMAL_MU, 0.0)), proximal_pull=bool(cfg.privacy.dp)
    )
    extra = task.round_callbacks(cfg, run_dir, partition_id, int(round_config[keys.SERVER_ROUND]), site)
    loader = task.datamodule(cfg, site, round_seed).train_dataloader()  # the site's own data, streamed
    private = _private_training(cfg, run_dir, partition_id, int(round_config[keys.SERVER_ROUND]))
    if private is not None:  # DP-SGD (fedvlm.privacy); refuses the round when the budget would be exceeded
        loader = private.private_loader(loader, int(round_config[keys.LOCAL_EPOCHS]))
        extra = [*extra, private]
    schedule: list[L.Callback] = [RoundLearningRate(float(round_config[keys.LEARNING_RATE]))]
    if int(cfg.federation.freeze_encoders_rounds) > 0:  # a fresh module each round: nothing to undo otherwise
        schedule.append(FreezeModules(bool(round_config[keys.FREEZE_ENCODERS]), list(cfg.model.freeze_modules)))
    timer = StepTimer()
    trainer = make_trainer(cfg, [*schedule, callback, timer, *extra], int(round_config[keys.LOCAL_EPOCHS]))
    trainer.fit(module, loader)
    site.embedding_cache.save()
    train_loss = trainer.callback_metrics.get("train/loss")
    metrics = {
        keys.TRAIN_LOSS: float(train_loss) if train_loss is not None else float("nan"),
        keys.TRAIN_SECONDS: time.perf_counter() - started,
        keys.STEP_SECONDS: timer.seconds,
    }
    if private is not None:
        # The exact training loss is a statistic of the protected records without noise: withheld under DP.
        metrics[keys.TRAIN_LOSS] = float("nan")
        metrics[keys.EPSILON] = private.finish()
    for extra_callback in extra:  # only aggregates a callback declares shareable (e.g. explanation quality)
        shareable = getattr(extra_callback, "shareable_metrics", None)
        if shareable is not None:
            metrics.update({k: float(v) for k, v in shareable().items()})
    return callback.local_state, int(site.counts["train"]), metrics


def _private_training(cfg: DictConfig, run_dir: Path, partition_id: int, server_round: int) -> PrivateTraining | None:
    """The round's DP-SGD callback over the client's privacy ledger, or None without ``privacy.dp``."""
    if not cfg.privacy.dp:
        return None
    from fedvlm.privacy import PrivacyLedger, PrivateTraining  # imports Opacus: only under DP

    ledger = PrivacyLedger(RunLayout(run_dir).ledger(partition_id))
    planned = None
    if cfg.privacy.target_epsilon is not None:  # from the run config alone: the server is not asked
        federation = cfg.federation
        clients = 1 if federation.mode == "centralized" else int(federation.num_clients)
        planned = planned_rounds(
            partition_id, clients, int(federation.clients_per_round), int(cfg.seed), int(federation.rounds)
        )
    return PrivateTraining(cfg.privacy, ledger, server_round, f"client {partition_id}", planned)


def build_global_module(
    task: Task, cfg: DictConfig, run_dir: Path, global_state: dict[str, torch.Tensor], fingerprint: str
) -> L.LightningModule:
    """The module as the server has it: built exactly as the server built its initial model
    (same seed), then loaded with the global weights the server sent.

    In adapter mode the server sends only what can change; the frozen backbones come from this
    construction, and ``fingerprint`` (the server's digest of them) proves they are the same.

    Raises:
        FederationError: If this client's frozen weights differ from the server's.
    """
    L.seed_everything(int(cfg.seed), verbose=False)
    module = task.build_module(cfg, run_dir)
    if fingerprint and _static_digest(module, str(run_dir)) != fingerprint:
        raise FederationError(
            "this client's frozen (never-sent) weights differ from the server's: both must build the model "
            "from the same model.*.pretrained weights and seed"
        )
    load_global_state(module, global_state)
    return module


_DIGESTS: dict[str, str] = {}


def _static_digest(module: L.LightningModule, run_dir: str) -> str:
    """The fingerprint of ``module``'s never-sent weights, computed once per process and run."""
    if run_dir not in _DIGESTS:
        _DIGESTS[run_dir] = static_fingerprint(module, travelling_keys(module))
    return _DIGESTS[run_dir]


RUN_DIR_KEY = "run-dir"
"""Node-config key (SuperNode) and run-config key (ServerApp) naming a prepared run directory."""


def make_client_app(run_dir: Path | None = None) -> ClientApp:
    """The ClientApp for a prepared run directory.

    In simulation every SuperNode sees the same ``run_dir`` and picks its shard by the
    ``partition-id`` Flower puts in its node config. With ``run_dir=None`` (the deployment engine)
    each SuperNode names its own copy in its node config as well:
    ``--node-config "run-dir='/data/fedvlm/site' partition-id=3"``.
    """
    app = ClientApp()

    def site_run_dir(context: Context) -> str:
        if run_dir is not None:
            return str(run_dir)
        if RUN_DIR_KEY not in context.node_config:
            raise FederationError(
                f"this SuperNode's node config has no {RUN_DIR_KEY!r}: start it with "
                f"--node-config \"{RUN_DIR_KEY}='/path/to/site/run' {keys.PARTITION_ID}=<id>\""
            )
        return str(context.node_config[RUN_DIR_KEY])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        run_dir_str = site_run_dir(context)
        partition_id = int(context.node_config[keys.PARTITION_ID])
        site = site_data(run_dir_str, partition_id, context.node_config)  # prepared here, on the site
        counts = {k: v for k, v in site.counts.items() if k != "fingerprint"}
        return Message(
            RecordDict(
                {
                    keys.METRICS: MetricRecord(
                        {
                            keys.PARTITION_ID: partition_id,
                            keys.NUM_EXAMPLES: int(site.counts["train"]),
                        }
                    ),
                    keys.CONFIG: ConfigRecord({keys.SITE_COUNTS: json.dumps(counts)}),
                }
            ),
            reply_to=msg,
        )

    @app.train(mods=[secure_aggregation_mod])  # SecAgg+ when the server runs it, else a no-op
    def train(msg: Message, context: Context) -> Message:
        received = time.perf_counter()
        run_dir_str = site_run_dir(context)
        cfg = _run_config(run_dir_str)
        partition_id = int(context.node_config[keys.PARTITION_ID])
        round_config: dict[str, Any] = dict(msg.content.config_records[keys.CONFIG])
        _maybe_fail(cfg, partition_id, int(round_config[keys.SERVER_ROUND]))
        global_state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
        from fedvlm.federation.byzantine import client_attack

        site = site_data(run_dir_str, partition_id, context.node_config)
        task = get_task(cfg.task)
        attack = client_attack(cfg, partition_id)  # federation.byzantine; a no-op for honest clients
        if attack.poisons_data:  # the task flips its own labels (config validation keeps it to the built-in tasks)
            attack.poison_training_data(site.train.tensors, lambda tensors: task.flip_labels(cfg, tensors))
        local_state, num_examples, metrics = train_locally(
            task, cfg, Path(run_dir_str), partition_id, dict(global_state), round_config, site
        )
        diverged = non_finite_keys(local_state)
        if diverged:  # never send NaN/Inf: averaged in, they would destroy the global model
            raise FederationError(
                f"local training diverged: non-finite weights in {diverged[:3]}"
                f"{' …' if len(diverged) > 3 else ''} (trainer.precision={cfg.trainer.precision}, "
                f"lr={round_config[keys.LEARNING_RATE]})"
            )
        reference = {k: global_state[k] for k in local_state}
        if keys.CENTRAL_CLIPPING_NORM in round_config:  # privacy.central.clipping=client: bound this client's update
            from fedvlm.federation.central_dp import clip_update

            local_state = clip_update(local_state, reference, float(round_config[keys.CENTRAL_CLIPPING_NORM]))[0]
        local_state = attack.poison(local_state, global_state, int(round_config[keys.ROUND_SEED]) + partition_id)
        codec = update_codecs.build(json.loads(str(round_config[keys.UPDATE_CODEC])))
        codec_seed = 2 * (int(round_config[keys.ROUND_SEED]) + partition_id) + 1  # a stream apart from the attack's
        residual = context.state.array_records.get(keys.CODEC_RESIDUAL)
        # the reference is exactly what the server sent: both sides know its keys and their order
        record, new_residual = encode_update(
            codec,
            local_state,
            global_state,
            codec_seed,
            residual.to_torch_state_dict() if residual else None,
            json.loads(str(round_config.get(keys.EXACT_KEYS, "[]"))),
        )
        if getattr(codec, "error_feedback", False):  # in node state: it survives a fresh ClientApp process
            context.state[keys.CODEC_RESIDUAL] = ArrayRecord(torch_state_dict=new_residual)
        metrics[keys.CLIENT_SECONDS] = time.perf_counter() - received
        return Message(
            RecordDict(
                {
                    keys.ARRAYS: record,
                    keys.METRICS: MetricRecord(
                        {keys.NUM_EXAMPLES: num_examples, keys.PARTITION_ID: partition_id, **metrics}
                    ),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run_dir_str = site_run_dir(context)
        cfg = _run_config(run_dir_str)
        partition_id = int(context.node_config[keys.PARTITION_ID])
        task = get_task(cfg.task)
        site = site_data(run_dir_str, partition_id, context.node_config)
        config = msg.content.config_records[keys.CONFIG]
        module = build_global_module(
            task,
            cfg,
            Path(run_dir_str),
            dict(msg.content.array_records[keys.ARRAYS].to_torch_state_dict()),
            str(config.get(keys.STATIC_FINGERPRINT, "")),
        )
        attach_embedding_cache(module, site.embedding_cache)
        reply: dict[str, Any] = {keys.PARTITION_ID: partition_id}
        datamodule = task.datamodule(cfg, site, int(cfg.seed))
        loaders = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}
        for split in keys.EVAL_SPLITS:  # the site's local validation and test splits, as counts
            metrics = task.make_metrics(cfg, mergeable=True)
            if int(site.counts[split]):
                task.evaluate(module, loaders[split](), metrics)
            reply[f"{split}/{keys.NUM_EXAMPLES}"] = int(site.counts[split])
            reply.update({f"{keys.EVAL_STATE_PREFIX}{split}/{k}": v for k, v in export_state(metrics).items()})
        site.embedding_cache.save()
        return Message(RecordDict({keys.METRICS: MetricRecord(reply)}), reply_to=msg)

    return app


def _maybe_fail(cfg: DictConfig, partition_id: int, server_round: int) -> None:
    if f"{partition_id}@{server_round}" in cfg.federation.faults:
        raise RuntimeError(f"injected failure of client {partition_id} in round {server_round} (federation.faults)")


__all__ = ["RUN_DIR_KEY", "make_client_app", "make_trainer", "site_data", "train_locally"]
