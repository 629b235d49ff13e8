"""Validation of a loaded config: choices, positive values, ranges and the rules that tie keys
together (DP with SecAgg+, Krum's clients per round, ``task: lightning``'s keys ...).

:func:`validate` is the last step of :func:`fedvlm.config.load_config`, so every command checks a
config the same way; each error names the key.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fedvlm.data.prepared import AUGMENTATIONS
from fedvlm.errors import ConfigError
from fedvlm.registry import registry_of

CHOICES: dict[str, tuple[str, ...]] = {
    "model.modality": ("fused", "image", "text"),
    "data.augment": AUGMENTATIONS,
    "optim.name": ("sgd", "adamw"),
    "optim.lr_schedule": ("linear", "constant"),
    "federation.mode": ("simulation", "async", "centralized"),
    "model.adapter.name": ("none", "lora"),
    "data.uncertain": ("ignore", "zeros", "ones"),
    "privacy.accountant": ("rdp", "prv"),
    "privacy.grad_sample_mode": ("hooks", "functorch"),
    "privacy.central.clipping": ("none", "server", "client"),
    "explain.image_baseline": ("mean", "blur", "black"),
    "explain.text_baseline": ("mask", "remove"),
    "evaluation.select_on": ("val", "test"),
}


def _validate_lightning(cfg: DictConfig) -> None:
    """What ``task: lightning`` (a user's module and DataModule) cannot do: the parts that need
    fedvlm's own data or model."""
    if not cfg.model.module_class or not cfg.data.datamodule_class:
        raise ConfigError("task=lightning needs model.module_class and data.datamodule_class (dotted paths)")
    unsupported = {
        "federation.mode=centralized": cfg.federation.mode == "centralized",
        "federation.byzantine.attack=label_flip": cfg.federation.byzantine.attack.name == "label_flip",
        "explain.enabled=true": bool(cfg.explain.enabled),
        "data.server_test": cfg.data.server_test is not None,
    }
    for setting, used in unsupported.items():
        if used:
            raise ConfigError(
                f"task=lightning does not support {setting}: it needs fedvlm's own data or model "
                "(task=leukemia or task=cxr); a centralized baseline is your DataModule over all data in one Trainer"
            )
    if not cfg.evaluation.select_metric:
        raise ConfigError(
            "task=lightning needs evaluation.select_metric: a metric your module logs in validation_step "
            "(without the val prefix), higher is better, e.g. acc"
        )


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges the type system cannot express.

    Raises:
        ConfigError: Naming the offending key.
    """
    if cfg.task == "lightning":
        _validate_lightning(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(allowed)}")
    positive = {
        "federation.rounds": cfg.federation.rounds,
        "federation.num_clients": cfg.federation.num_clients,
        "federation.min_clients": cfg.federation.min_clients,
        "trainer.batch_size": cfg.trainer.batch_size,
        "trainer.local_epochs": cfg.trainer.local_epochs,
        "model.num_stages": cfg.model.num_stages,
        "data.image_size": cfg.data.image_size,
        "optim.lr": cfg.optim.lr,
        "explain.every": cfg.explain.every,
        "explain.max_evals": cfg.explain.max_evals,
        "explain.top_k": cfg.explain.top_k,
        "federation.evaluate_every": cfg.federation.evaluate_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={cfg.data.test_fraction} must be in (0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if cfg.federation.clients_per_round > cfg.federation.num_clients:
        raise ConfigError(
            f"federation.clients_per_round={cfg.federation.clients_per_round} exceeds "
            f"federation.num_clients={cfg.federation.num_clients}"
        )
    if not 0 <= cfg.federation.evaluate_clients_per_round <= cfg.federation.num_clients:
        raise ConfigError(
            f"federation.evaluate_clients_per_round={cfg.federation.evaluate_clients_per_round} must be in "
            f"0..federation.num_clients={cfg.federation.num_clients} (0: every client)"
        )
    if cfg.federation.min_clients > cfg.federation.num_clients or (
        cfg.federation.clients_per_round and cfg.federation.min_clients > cfg.federation.clients_per_round
    ):
        raise ConfigError(
            f"federation.min_clients={cfg.federation.min_clients} exceeds the clients asked each round "
            f"(num_clients={cfg.federation.num_clients}, clients_per_round={cfg.federation.clients_per_round})"
        )
    if not 0.0 <= cfg.model.modality_dropout <= 0.5:
        raise ConfigError(f"model.modality_dropout={cfg.model.modality_dropout} must be in [0, 0.5]")
    if cfg.model.unimodal_loss_weight < 0:
        raise ConfigError(f"model.unimodal_loss_weight={cfg.model.unimodal_loss_weight} must be >= 0")
    if not 0.0 <= cfg.model.fusion_gradient_scale <= 1.0:
        raise ConfigError(f"model.fusion_gradient_scale={cfg.model.fusion_gradient_scale} must be in [0, 1]")
    if cfg.model.fusion_gradient_scale == 0 and cfg.model.unimodal_loss_weight == 0:
        raise ConfigError(
            "model.fusion_gradient_scale=0 leaves the encoders without any gradient: set model.unimodal_loss_weight > 0"
        )
    if cfg.model.late_fusion_weight < 0:
        raise ConfigError(f"model.late_fusion_weight={cfg.model.late_fusion_weight} must be >= 0")
    if cfg.model.late_fusion_weight > 0 and cfg.model.modality == "fused" and cfg.model.unimodal_loss_weight == 0:
        raise ConfigError(
            f"model.late_fusion_weight={cfg.model.late_fusion_weight} combines the fused heads with the image "
            "encoder's auxiliary head: set model.unimodal_loss_weight > 0 (or late_fusion_weight=0)"
        )
    if cfg.model.logit_adjustment < 0:
        raise ConfigError(f"model.logit_adjustment={cfg.model.logit_adjustment} must be >= 0")
    bad_excluded = [c for c in cfg.federation.exclude_clients if not 0 <= c < cfg.federation.num_clients]
    if bad_excluded:
        raise ConfigError(f"federation.exclude_clients={bad_excluded}: clients are 0..{cfg.federation.num_clients - 1}")
    if cfg.contrastive.temperature <= 0:
        raise ConfigError(f"contrastive.temperature={cfg.contrastive.temperature} must be positive")
    _validate_byzantine(cfg.federation)
    _validate_secure_aggregation(cfg.federation)
    _validate_privacy(cfg)
    _validate_async(cfg)


def _validate_byzantine(federation: DictConfig) -> None:
    """Simulated Byzantine clients (``federation.byzantine``): who attacks."""
    byzantine = federation.byzantine
    if not 0.0 <= byzantine.fraction < 1.0:
        raise ConfigError(f"federation.byzantine.fraction={byzantine.fraction} must be in [0, 1)")
    outside = [pid for pid in byzantine.clients if not 0 <= pid < federation.num_clients]
    if outside:
        raise ConfigError(
            f"federation.byzantine.clients={list(byzantine.clients)}: clients {outside} are not partitions "
            f"0..{federation.num_clients - 1} (federation.num_clients={federation.num_clients})"
        )
    if byzantine.clients and byzantine.fraction > 0:
        raise ConfigError("federation.byzantine: set clients or fraction, not both")
    drawn = int(byzantine.fraction * federation.num_clients + 1e-9)
    if byzantine.attack.name != "none" and not byzantine.clients and drawn == 0:
        raise ConfigError(
            f"federation.byzantine.attack={byzantine.attack.name} names no client: set federation.byzantine.clients "
            f"or a federation.byzantine.fraction ≥ 1/num_clients"
        )


def _validate_secure_aggregation(federation: DictConfig) -> None:
    """``federation.secure_aggregation``: ranges, and what cannot be computed from a sum alone."""
    secure = federation.secure_aggregation
    if secure.clipping_range <= 0:
        raise ConfigError(f"federation.secure_aggregation.clipping_range={secure.clipping_range} must be positive")
    if not 2 <= secure.quantization_range < 2**31:
        raise ConfigError(
            f"federation.secure_aggregation.quantization_range={secure.quantization_range} must be in [2, 2**31)"
        )
    if secure.max_weight is not None and secure.max_weight <= 0:
        raise ConfigError(f"federation.secure_aggregation.max_weight={secure.max_weight} must be positive")
    for key in ("num_shares", "reconstruction_threshold"):
        value = secure[key]
        if value <= 0 or (value > 1 and value != int(value)):
            raise ConfigError(
                f"federation.secure_aggregation.{key}={value} must be a fraction in (0, 1] or a whole count"
            )
    if not secure.enabled:
        return
    if not _linear(federation):
        raise ConfigError(
            f"federation.secure_aggregation.enabled: the server sees only the sum of the updates, so "
            f"federation.strategy={federation.strategy.name} (which needs each client's update) cannot run; "
            f"use a linear one: {', '.join(_linear_strategies())}"
        )
    if federation.codec.name != "none":
        raise ConfigError(
            f"federation.secure_aggregation.enabled quantises the updates itself: "
            f"federation.codec={federation.codec.name} must be none"
        )
    if federation.mode == "centralized":
        raise ConfigError("federation.secure_aggregation.enabled needs federation.mode=simulation (several clients)")


def _validate_privacy(cfg: DictConfig) -> None:
    """``privacy``: ranges, and the settings under which DP-SGD's guarantee would not hold."""
    privacy = cfg.privacy
    for key in ("noise_multiplier", "max_grad_norm"):
        if privacy[key] <= 0:
            raise ConfigError(f"privacy.{key}={privacy[key]} must be positive")
    if not 0.0 < privacy.delta < 1.0:
        raise ConfigError(f"privacy.delta={privacy.delta} must be in (0, 1)")
    if privacy.max_epsilon is not None and privacy.max_epsilon <= 0:
        raise ConfigError(f"privacy.max_epsilon={privacy.max_epsilon} must be positive (or null: no budget)")
    if privacy.target_epsilon is not None:
        if privacy.target_epsilon <= 0:
            raise ConfigError(f"privacy.target_epsilon={privacy.target_epsilon} must be positive (or null)")
        if privacy.max_epsilon is not None and privacy.max_epsilon < privacy.target_epsilon:
            raise ConfigError(
                f"privacy.max_epsilon={privacy.max_epsilon} is below privacy.target_epsilon={privacy.target_epsilon}: "
                "the run would stop before the rounds its noise was set for; drop one of them"
            )
        if cfg.federation.mode == "async":
            raise ConfigError(
                "privacy.target_epsilon needs the rounds a client trains in ahead of time, which federation.mode=async "
                "does not fix: set privacy.noise_multiplier and privacy.max_epsilon instead"
            )
    _validate_central_dp(cfg)
    if not privacy.dp:
        return
    if cfg.task == "cxr" and cfg.model.modality == "fused":
        raise ConfigError(
            "privacy.dp=true with task=cxr needs model.modality=image or text: the fused model's InfoNCE loss "
            "couples the samples of a batch (each pair is every other pair's negative), so one record changes "
            "every per-sample gradient and per-sample clipping bounds nothing; the unimodal label-head losses "
            "are per-sample and can be trained with DP-SGD"
        )
    if cfg.model.logit_adjustment > 0:
        raise ConfigError(
            f"model.logit_adjustment={cfg.model.logit_adjustment} with privacy.dp: the loss would use the exact "
            "label counts of the client's data, which DP-SGD's accounting does not cover; set it to 0"
        )
    if cfg.trainer.gradient_clip_val is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={cfg.trainer.gradient_clip_val} has no effect under privacy.dp "
            "(DP-SGD clips each sample's gradient to privacy.max_grad_norm): leave it null"
        )
    if str(cfg.trainer.precision) not in ("32-true", "32"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: privacy.dp trains in 32-true precision only")
    if str(cfg.trainer.devices) != "1":
        raise ConfigError(f"trainer.devices={cfg.trainer.devices}: privacy.dp trains each client on one device")


def _validate_central_dp(cfg: DictConfig) -> None:
    """``privacy.central``: ranges, and the strategies its noise is calibrated for."""
    central = cfg.privacy.central
    if central.clipping_norm <= 0:
        raise ConfigError(f"privacy.central.clipping_norm={central.clipping_norm} must be positive")
    if central.noise_multiplier < 0:
        raise ConfigError(f"privacy.central.noise_multiplier={central.noise_multiplier} must be >= 0")
    if not 0.0 < central.delta < 1.0:
        raise ConfigError(f"privacy.central.delta={central.delta} must be in (0, 1)")
    if central.clipping != "none":
        if not _linear(cfg.federation):
            raise ConfigError(
                f"privacy.central.clipping needs a linear federation.strategy ({', '.join(_linear_strategies())}), "
                f"not {cfg.federation.strategy.name!r}: central DP's noise σ·C/m is calibrated to the uniform mean "
                "of clipped updates, and robust aggregation rules are not analysed with it "
                "(set privacy.central.clipping=none)"
            )
        if central.clipping == "server" and cfg.federation.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.central.clipping=server needs each client's update, which "
                "federation.secure_aggregation.enabled hides from the server: use privacy.central.clipping=client"
            )


def _validate_async(cfg: DictConfig) -> None:
    """The virtual clock's ranges, and what buffered asynchronous aggregation composes with."""
    federation = cfg.federation
    if not 0.0 <= federation.dropout < 1.0:
        raise ConfigError(f"federation.dropout={federation.dropout} must be in [0, 1)")
    if federation.buffer_size < 1:
        raise ConfigError(f"federation.buffer_size={federation.buffer_size} must be >= 1")
    if federation.max_staleness < 0:
        raise ConfigError(f"federation.max_staleness={federation.max_staleness} must be >= 0")
    if federation.mode != "async":
        return
    if not _linear(federation):
        raise ConfigError(
            f"federation.mode=async needs a linear strategy ({', '.join(_linear_strategies())}), not "
            f"{federation.strategy.name!r}: a buffer is aggregated as the staleness-weighted mean of its updates"
        )
    if cfg.privacy.central.clipping != "none":
        raise ConfigError(
            "privacy.central.clipping does not compose with federation.mode=async yet: use federation.mode=simulation"
        )
    if federation.secure_aggregation.enabled:
        # SecAgg+ over each buffer: cohorts of K clients sent together (AsyncRounds._run_secure)
        if federation.buffer_size < 3:
            raise ConfigError(
                f"federation.buffer_size={federation.buffer_size}: SecAgg+ over a buffer needs at least 3 clients "
                "(a sum of two updates tells each client the other's); a larger buffer hides each update in more"
            )
        if federation.weight_by_duration:
            raise ConfigError(
                "federation.weight_by_duration weighs each update of a buffer apart, which SecAgg+ hides: "
                "set it false with federation.secure_aggregation.enabled"
            )
        at_work = federation.clients_per_round or federation.num_clients
        if at_work < federation.buffer_size:
            raise ConfigError(
                f"federation.buffer_size={federation.buffer_size}: {at_work} clients at work "
                "(federation.clients_per_round, 0: federation.num_clients) cannot form SecAgg+ cohorts that large"
            )


def _linear(federation: DictConfig) -> bool:
    """Whether ``federation.strategy`` declares a linear aggregate (a weighted mean of the updates)."""
    return bool(getattr(registry_of("fedvlm.strategies").get(federation.strategy.name), "linear", False))


def _linear_strategies() -> list[str]:
    strategies = registry_of("fedvlm.strategies")
    return [name for name in strategies.names() if getattr(strategies.get(name), "linear", False)]
