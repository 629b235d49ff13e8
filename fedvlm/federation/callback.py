"""The Lightning callback that connects a LightningModule to a federated round.

At fit start it loads the global weights sent by the server; during training it applies the
FedProx proximal term; at fit end it captures the local weights to send back. The round's encoder
freeze (:class:`FreezeModules`) and learning rate (:class:`RoundLearningRate`) are callbacks too:
the user's LightningModule never learns that Flower exists.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from typing_extensions import override

from fedvlm.errors import ConfigError, FederationError
from fedvlm.models.frozen import held_batchnorms, update_digest


class FederatedRoundCallback(L.Callback):
    """Swap weights with the server around one round of local training.

    Args:
        global_state: The global weights of this round (all keys, or the subset that travels).
        proximal_mu: FedProx μ. The local objective becomes ``F_k(w) + μ/2 ‖w − w_global‖²``
            (Li et al. 2020, Eq. 2); its gradient ``μ (w − w_global)`` is added to every
            trainable parameter's gradient just before the optimiser step — after mixed
            precision has unscaled the gradients, before gradient clipping.
        proximal_pull: Apply FedProx as a pull after each optimiser step instead,
            ``w ← w − η·μ·(w − w_global)`` with ``η`` the step's learning rate (a proximal step
            on the same term). Used under DP-SGD, where a gradient term would be clipped and
            noised away; it reads only the public ``w_global``, so it costs no privacy.

    Attributes:
        local_state: After ``fit``, the trained values of the keys that travel this round
            (the trainable parameters and the floating buffers), on CPU.
    """

    def __init__(
        self, global_state: Mapping[str, torch.Tensor], proximal_mu: float = 0.0, proximal_pull: bool = False
    ) -> None:
        super().__init__()
        self.global_state = dict(global_state)
        self.proximal_mu = proximal_mu
        self.proximal_pull = proximal_pull
        self.local_state: dict[str, torch.Tensor] = {}
        self._anchors: dict[str, torch.Tensor] = {}

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        load_global_state(pl_module, self.global_state)
        if self.proximal_mu > 0:
            self._anchors = {
                name: param.detach().clone() for name, param in pl_module.named_parameters() if param.requires_grad
            }

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._anchors or self.proximal_pull:
            return
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                if param.grad is not None and name in self._anchors:
                    param.grad.add_(param - self._anchors[name], alpha=self.proximal_mu)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if not self._anchors or not self.proximal_pull:
            return
        anchors = {id(p): self._anchors[name] for name, p in pl_module.named_parameters() if name in self._anchors}
        with torch.no_grad():
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        if id(param) in anchors:
                            param.sub_(param - anchors[id(param)], alpha=float(group["lr"]) * self.proximal_mu)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Flower's ArrayRecord has no bfloat16: such weights travel as float32.
        self.local_state = {
            key: (value.float() if value.dtype == torch.bfloat16 else value).detach().cpu().clone()
            for key, value in pl_module.state_dict().items()
            if key in travelling_keys(pl_module)
        }


class StepTimer(L.Callback):
    """Seconds spent inside training steps (forward, backward, optimiser), summed over a fit.

    What a client-round costs beyond this (process and Trainer start-up, model construction,
    data loading, encoding the reply) is its fixed cost (``benchmarks/scale.py``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self._started = 0.0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        self.seconds += time.perf_counter() - self._started


class FreezeModules(L.Callback):
    """Freeze named submodules for one local round (Fed-MMX's encoder freeze in the first
    ``federation.freeze_encoders_rounds`` rounds), from the outside, as Lightning's
    ``BaseFinetuning`` does: the module needs no freezing method of its own.

    Applied in ``setup``, before ``configure_optimizers`` builds the optimizer, so that an
    optimizer over the trainable parameters leaves the frozen ones out; frozen weights then do
    not travel (:func:`travelling_keys`). In adapter mode (the module holds LoRA matrices) the
    backbones stay frozen for good; only the ``lora_`` matrices follow ``frozen``.

    Args:
        frozen: Freeze (True) or train (False) the submodules this round.
        names: Attribute names of the submodules (``model.freeze_modules``); an attribute that is
            None (a tower the modality leaves out) is skipped.

    Raises:
        ConfigError: In ``setup``, naming an attribute the module does not have.
    """

    def __init__(self, frozen: bool, names: Sequence[str]) -> None:
        super().__init__()
        self.frozen, self.names = frozen, tuple(names)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        set_frozen(pl_module, self.names, self.frozen)


def set_frozen(module: torch.nn.Module, names: Sequence[str], frozen: bool) -> None:
    """Freeze or unfreeze ``module``'s submodules ``names`` (see :class:`FreezeModules`).

    Raises:
        ConfigError: Naming an attribute ``module`` does not have.

    Example:
        >>> net = torch.nn.Sequential()
        >>> net.backbone, net.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        >>> set_frozen(net, ["backbone"], frozen=True)
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['head.bias', 'head.weight']
    """
    from fedvlm.models.adapters import set_encoders_trainable

    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise ConfigError(
            f"model.freeze_modules names {missing[0]!r}, which {type(module).__name__} does not have "
            f"(submodules: {', '.join(n for n, _ in module.named_children())})"
        )
    parts = [getattr(module, name) for name in names if getattr(module, name) is not None]
    # Adapter mode is the model's: a tower without LoRA targets keeps its backbone frozen too.
    adapter_mode = any(".lora_" in f".{name}" for name, _ in module.named_parameters())
    set_encoders_trainable(parts, not frozen, adapter_mode=adapter_mode)


class RoundLearningRate(L.Callback):
    """Set the round's learning rate (the server's ``optim.lr_schedule`` over rounds) on every
    parameter group of every optimizer, once they exist (``on_fit_start``), before any step.

    Args:
        learning_rate: This round's rate.
    """

    def __init__(self, learning_rate: float) -> None:
        super().__init__()
        self.learning_rate = learning_rate

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate


def travelling_keys(module: torch.nn.Module) -> set[str]:
    """State-dict keys that leave a client this round: trainable parameters and float buffers.

    Frozen parameters (e.g. encoders during the first rounds) do not change, so they do not
    travel; this is what makes the encoder-freeze rounds cheap on the wire. Nor do the running
    statistics of frozen BatchNorm layers, which the encoders hold in eval mode
    (:func:`fedvlm.models.frozen.held_batchnorms`).
    """
    keys = {name for name, param in module.named_parameters() if param.requires_grad}
    persistent = set(module.state_dict())
    held = tuple(f"{name}." for name in held_batchnorms(module))
    keys |= {
        name
        for name, buf in module.named_buffers()
        if buf.is_floating_point() and name in persistent and not name.startswith(held)
    }
    return keys


def non_finite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating-point entries of ``state`` holding NaN or Inf, sorted: an update with any
    must not be averaged into the global model."""
    return sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())


def load_global_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``; every key must exist in the module with the same shape.

    Raises:
        FederationError: Naming keys that the module does not have or whose shapes differ.
    """
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise FederationError(f"global weights carry keys the model does not have: {unknown[:5]}")
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise FederationError(f"global weights have the wrong shape for: {mismatched[:5]}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def static_fingerprint(module: torch.nn.Module, travelling: set[str]) -> str:
    """SHA-256 of the state that never travels (frozen backbones in adapter mode).

    Server and clients build the module the same way (same seed or the same pretrained
    weights), so this part is identical everywhere by construction; the digest proves it each
    round instead of trusting it.
    """
    digest = hashlib.sha256()
    update_digest(digest, ((key, value) for key, value in sorted(module.state_dict().items()) if key not in travelling))
    return digest.hexdigest()
