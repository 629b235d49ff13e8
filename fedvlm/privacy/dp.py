"""DP-SGD for one client's round of Lightning training (Abadi et al. 2016, with Opacus).

Each step samples every local training record independently with probability ``q`` (Poisson
sampling), clips each record's gradient to L2 norm ``C`` (``privacy.max_grad_norm``), sums, adds
``N(0, σ²C²)`` per coordinate (``σ`` = ``privacy.noise_multiplier``) and divides by the expected
batch size ``q·N``. ``q`` is Opacus' ``1 / ⌈N / batch_size⌉``, so ``trainer.batch_size`` becomes
the expected batch size.

The user's LightningModule is not changed: :class:`PrivateTraining` is a Lightning callback.
The client hands it the round's ``DataLoader`` (:meth:`PrivateTraining.private_loader` returns
the Poisson-sampled one to fit on); at fit start it lets Opacus attach per-sample-gradient hooks
to the module (``wrap_model=False``, so Lightning keeps its module) and swaps the optimizer the
module's own ``configure_optimizers`` built for Opacus' ``DPOptimizer`` around it. After fit,
:meth:`PrivateTraining.finish` checks that the accountant saw exactly the optimizer steps taken
and appends the round to the client's :class:`~fedvlm.privacy.accountant.PrivacyLedger`.

Noise and Poisson sampling draw from generators seeded with OS randomness each round, never
from the run seed: the server knows the seed, and noise it can predict protects nothing.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from fedvlm.errors import ConfigError, PrivacyBudgetExhausted
from fedvlm.models.frozen import held_batchnorms
from fedvlm.privacy.accountant import HistoryEntry, PrivacyLedger

log = logging.getLogger(__name__)


def check_private_trainable(module: nn.Module) -> None:
    """Refuse a model with layers DP-SGD cannot train privately, naming them.

    BatchNorm normalises each sample by statistics of the whole batch, so one record changes
    every other record's gradient, and its running statistics (buffers that travel to the
    server) are computed from the records without noise. Opacus' ``ModuleValidator.fix`` would
    swap it for GroupNorm, but the model must be the same on the server, on every client and in
    checkpoints, so fedvlm rejects it instead: choose an encoder without BatchNorm, or freeze it.
    A frozen BatchNorm inside an encoder is held in eval mode
    (:func:`fedvlm.models.frozen.held_batchnorms`): a fixed affine map of each sample, accepted.

    Raises:
        ConfigError: Listing each offending submodule as ``name (Type): reason``.
    """
    problems = []
    held = set(held_batchnorms(module))
    for name, submodule in module.named_modules():
        if isinstance(submodule, nn.modules.batchnorm._BatchNorm):
            if name not in held:
                problems.append(f"{name} ({type(submodule).__name__}): BatchNorm mixes the samples of a batch")
        elif type(submodule) in ModuleValidator.VALIDATORS:
            reasons = ModuleValidator.VALIDATORS[type(submodule)](submodule)
            problems.extend(f"{name} ({type(submodule).__name__}): {reason}" for reason in reasons)
    if problems:
        raise ConfigError(
            "privacy.dp=true: the model has layers DP-SGD cannot train privately: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Use encoders without BatchNorm (e.g. vit_micro / vit_tiny instead of a ResNet), or freeze them "
            "(model.adapter with empty targets)"
        )


def batch_shaped_ids(module: nn.Module) -> list[RemovableHandle]:
    """Give every ``transformers`` model in ``module`` batch-shaped ``position_ids`` and
    ``token_type_ids`` when the caller passes none.

    BERT-style embeddings default to ``[1, L]`` buffers broadcast over the batch; Opacus' hooks
    then see an embedding input without the batch dimension and fail. ``[B, L]`` ids with the
    same values give the same forward pass and correct per-sample gradients, and the position
    and token-type embeddings keep training.

    Returns:
        The forward pre-hook handles (``handle.remove()`` undoes them).
    """
    from transformers import PreTrainedModel

    handles = []
    for submodule in module.modules():
        if not isinstance(submodule, PreTrainedModel):
            continue
        accepted = set(inspect.signature(submodule.forward).parameters)
        wanted = {"position_ids", "token_type_ids"} & accepted
        if wanted:
            handles.append(submodule.register_forward_pre_hook(_ids_hook(wanted), with_kwargs=True))
    return handles


def _ids_hook(wanted: set[str]) -> Any:
    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return args, kwargs
        batch, length = input_ids.shape
        if "position_ids" in wanted and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(length, device=input_ids.device).expand(batch, length)
        if "token_type_ids" in wanted and kwargs.get("token_type_ids") is None:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        return args, kwargs

    return hook


def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str) -> float:
    """σ for which ``steps`` DP-SGD steps at sample rate ``q`` end at ε ≤ ``target_epsilon`` (at
    ``delta``): Opacus' ``get_noise_multiplier`` (a bisection to within 0.01 of the target), as
    ``make_private_with_epsilon`` uses for one training, here over all of a client's rounds.

    Example:
        >>> sigma = calibrated_noise(8.0, 1e-5, sample_rate=0.25, steps=80, mechanism="rdp")
        >>> from fedvlm.privacy.accountant import compute_epsilon
        >>> 7.99 <= compute_epsilon("rdp", [(sigma, 0.25, 80)], 1e-5) <= 8.0
        True

    Raises:
        ConfigError: If no σ reaches the target (Opacus gives up past σ ≈ 2000).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=mechanism,
            )
        )
    except ValueError as err:
        raise ConfigError(
            f"privacy.target_epsilon={target_epsilon:g}: no noise multiplier reaches it in {steps} steps at "
            f"q={sample_rate:.4g} ({err})"
        ) from err


def _secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS (not the run seed, which the server knows)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


class PrivateTraining(L.Callback):
    """Make one round of a client's Lightning training DP-SGD and account for it.

    Args:
        privacy: The ``privacy`` config section (``noise_multiplier``, ``max_grad_norm``,
            ``delta``, ``accountant``, ``max_epsilon``, ``poisson_sampling``, ``grad_sample_mode``).
        ledger: The client's ledger; the round is appended to it by :meth:`finish`.
        server_round: The round being trained.
        client: How messages name the client (``"client 3"``).
        planned_rounds: With ``privacy.target_epsilon``: the rounds this client trains in over
            the run (:func:`~fedvlm.federation.sampling.planned_rounds`); its σ is set so that
            they end at the target, and a round past it is refused.

    Example:
        ``private = PrivateTraining(cfg.privacy, PrivacyLedger(path), 3, "client 0")``, then
        ``trainer = Trainer(callbacks=[private, ...])``,
        ``trainer.fit(module, private.private_loader(loader, local_epochs))`` and
        ``epsilon = private.finish()``.

    Attributes:
        sample_rate: ``q`` of this round (after :meth:`private_loader`).
        planned_steps: Optimizer steps the round will take (``local_epochs · 1/q``).
        steps_taken: Parameter updates the wrapped optimizer actually made.
    """

    def __init__(
        self,
        privacy: Mapping[str, Any],
        ledger: PrivacyLedger,
        server_round: int,
        client: str,
        planned_rounds: int | None = None,
    ) -> None:
        super().__init__()
        self.noise_multiplier = float(privacy["noise_multiplier"])
        self.max_grad_norm = float(privacy["max_grad_norm"])
        self.delta = float(privacy["delta"])
        self.mechanism = str(privacy["accountant"])
        self.max_epsilon = None if privacy["max_epsilon"] is None else float(privacy["max_epsilon"])
        target = privacy.get("target_epsilon")
        self.target_epsilon = None if target is None else float(target)
        if self.target_epsilon is not None:
            if not planned_rounds or planned_rounds < 1:
                raise ValueError(f"privacy.target_epsilon needs the rounds {client} trains in, got {planned_rounds}")
            # the target is also the budget: a round beyond the planned ones (a re-run) is refused
            self.max_epsilon = min(self.max_epsilon or self.target_epsilon, self.target_epsilon)
        self.planned_rounds = planned_rounds
        self.poisson_sampling = bool(privacy["poisson_sampling"])
        self.grad_sample_mode = str(privacy["grad_sample_mode"])
        self.ledger = ledger
        self.server_round = server_round
        self.client = client
        self.sample_rate = 0.0
        self.planned_steps = 0
        self.steps_taken = 0
        self.engine: PrivacyEngine | None = None
        self._loader: DataLoader[Any] | None = None
        self._handles: list[Any] = []

    def private_loader(self, loader: DataLoader[Any], local_epochs: int) -> DataLoader[Any]:
        """The loader to fit on: Poisson sampling (expected batch size ``loader.batch_size``),
        drawn with a secret generator. Checks the budget first.

        Raises:
            PrivacyBudgetExhausted: If this round's steps would take ε past ``max_epsilon``.
        """
        generator = _secret_generator()
        shuffled = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
        )
        private = DPDataLoader.from_data_loader(shuffled, generator=generator) if self.poisson_sampling else shuffled
        self.sample_rate = 1.0 / len(private)
        self.planned_steps = local_epochs * len(private)
        if self.target_epsilon is not None:
            assert self.planned_rounds is not None
            # the same σ every round (the data, hence q and the steps, do not change): all rounds end at the target
            steps = self.planned_rounds * self.planned_steps
            self.noise_multiplier = calibrated_noise(
                self.target_epsilon, self.delta, self.sample_rate, steps, self.mechanism
            )
        self.check_budget()
        self._loader = private
        return private

    def check_budget(self) -> float:
        """ε after this round's planned steps; raises when that exceeds ``max_epsilon``."""
        planned: list[HistoryEntry] = [(self.noise_multiplier, self.sample_rate, self.planned_steps)]
        would_be = self.ledger.epsilon(self.mechanism, self.delta, planned)
        if self.max_epsilon is not None and would_be > self.max_epsilon:
            spent = self.ledger.epsilon(self.mechanism, self.delta)
            raise PrivacyBudgetExhausted(
                f"{self.client} has spent ε={spent:.4g} (δ={self.delta:g}) and round "
                f"{self.server_round}'s {self.planned_steps} steps "
                f"(σ={self.noise_multiplier:g}, q={self.sample_rate:.4g}) would take it to ε={would_be:.4g} "
                f"> privacy.max_epsilon={self.max_epsilon:g}; it does not train"
            )
        return would_be

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loader is None:
            raise RuntimeError("PrivateTraining: fit on the loader from private_loader()")
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"privacy.dp supports modules with one optimizer, got {len(trainer.optimizers)}")
        check_private_trainable(pl_module)
        if hasattr(pl_module, "per_sample_loss"):
            pl_module.per_sample_loss = True  # type: ignore[assignment]  # losses decompose per record
        optimizer = trainer.optimizers[0]
        self.engine = PrivacyEngine(accountant=self.mechanism)
        hooks, dp_optimizer, _ = self.engine.make_private(
            module=pl_module,
            optimizer=optimizer,
            data_loader=self._loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=False,  # the loader is already Poisson-sampled, with our secret generator
            grad_sample_mode=self.grad_sample_mode,
            wrap_model=False,  # hooks on the LightningModule itself: Lightning keeps its module
            noise_generator=_secret_generator(pl_module.device),
        )
        if self.poisson_sampling:
            hooks.forbid_grad_accumulation()  # a Poisson batch is one step; accumulation would break q
        self._handles = [hooks, *batch_shaped_ids(pl_module)]
        self._handles.append(optimizer.register_step_post_hook(self._count_step))
        trainer.strategy.optimizers = [dp_optimizer]

    def _count_step(self, *_: Any) -> None:
        self.steps_taken += 1

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            if isinstance(handle, RemovableHandle):
                handle.remove()
            else:
                handle.cleanup()  # Opacus' per-sample-gradient hooks
        self._handles = []

    def round_history(self) -> list[HistoryEntry]:
        """This round's Opacus history ``[(σ, q, steps)]`` as the accountant recorded it."""
        if self.engine is None:
            return []
        return [(float(s), float(q), int(n)) for s, q, n in self.engine.accountant.history]

    def finish(self) -> float:
        """Check the step count, append the round to the ledger; returns the cumulative ε.

        Raises:
            RuntimeError: If the accountant recorded a different number of steps than the
                optimizer took (the reported ε would be wrong).
        """
        history = self.round_history()
        accounted = sum(steps for _, _, steps in history)
        if accounted != self.steps_taken:
            raise RuntimeError(
                f"{self.client}: the privacy accountant recorded {accounted} steps but the optimizer took "
                f"{self.steps_taken}; ε would be wrong, so the round's update is not sent"
            )
        epsilon = self.ledger.record(self.server_round, history, self.mechanism, self.delta)
        log.info(
            "%s: round %d, %d DP-SGD steps, ε=%.4g (δ=%g)",
            self.client,
            self.server_round,
            accounted,
            epsilon,
            self.delta,
        )
        return epsilon
