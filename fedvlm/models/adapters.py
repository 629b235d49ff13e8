"""Lightweight adapters: LoRA on the linear layers of frozen backbones.

In adapter mode a backbone's own weights are frozen for the whole run and small low-rank
matrices are trained instead (Hu et al. 2022, LoRA): a wrapped linear layer computes

    y = W x + b + (α / r) · B A x,    A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, B initialised to 0,

so training starts exactly from the backbone's function. Only trainable parameters travel in
a federated round (see :func:`fedvlm.federation.callback.travelling_keys`), so a round costs
the adapters, the projection heads and the temperature, not the backbones.

LoRA targets ``nn.Linear`` layers named by their last attribute name: ``qkv``/``proj``/``fc1``/
``fc2`` in timm ViTs, ``query``/``key``/``value``/``dense`` in ``transformers`` BERTs. A CNN
tower has no such layers; give it an empty target list and it stays frozen (only the projection
head trains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedvlm.errors import ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: The layer to adapt (its parameters are frozen).
        rank: ``r``, the rank of the update.
        alpha: ``α``; the update is scaled by ``α / r``.
        dropout: Dropout on the adapter's input.

    Example:
        >>> layer = LoRALinear(nn.Linear(4, 3), rank=2, alpha=4.0)
        >>> x = torch.randn(5, 4)
        >>> torch.equal(layer(x), layer.base(x))  # B = 0: the adapted layer starts as the base
        True
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"model.adapter.rank={rank} must be positive")
        self.base = base
        self.base.requires_grad_(False)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_up(self.lora_down(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``W + (α/r) · B A``: the plain linear layer this adapter is equivalent to."""
        return self.base.weight + self.scaling * self.lora_up.weight @ self.lora_down.weight


def apply_lora(
    module: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0, where: str = "model"
) -> list[str]:
    """Freeze ``module`` and wrap its ``nn.Linear`` layers named in ``targets`` with LoRA.

    Args:
        module: A backbone (timm model, ``transformers`` model).
        targets: Last attribute names of the layers to adapt (``["qkv"]``); empty freezes the
            whole module without adapters.
        rank: LoRA rank ``r``.
        alpha: LoRA ``α``.
        dropout: Dropout on the adapters' input.
        where: The config key of the target list, for error messages.

    Returns:
        The dotted names of the wrapped layers.

    Raises:
        ConfigError: If ``targets`` is not empty and matches no linear layer; lists the names
            of the linear layers there are.
    """
    module.requires_grad_(False)
    if not targets:
        return []
    wanted = set(targets)
    matches = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
    ]
    if not matches:
        available = sorted(
            {name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)}
        )
        raise ConfigError(
            f"{where}={list(targets)} matches no linear layer; linear layers are named: "
            f"{', '.join(available) or '(none: use an empty list to freeze this tower)'}"
        )
    for name, child in matches:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        assert isinstance(child, nn.Linear)
        setattr(parent, attr, LoRALinear(child, rank, alpha, dropout))
    return [name for name, _ in matches]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def adapt_encoders(
    adapter: Mapping[str, Any] | None, image_encoder: nn.Module | None, text_encoder: nn.Module | None
) -> list[str]:
    """Apply the ``model.adapter`` config section to the encoders (a no-op for ``name: none``).

    Returns:
        The dotted names of the adapted layers (prefixed ``image.``/``text.``); empty when not in
        adapter mode.
    """
    if adapter is None or adapter.get("name", "none") == "none":
        return []
    rank, alpha, dropout = int(adapter["rank"]), float(adapter["alpha"]), float(adapter["dropout"])
    adapted: list[str] = []
    for prefix, encoder in (("image", image_encoder), ("text", text_encoder)):
        if encoder is not None:
            targets = list(adapter[f"{prefix}_targets"])
            names = apply_lora(encoder, targets, rank, alpha, dropout, where=f"model.adapter.{prefix}_targets")
            adapted += [f"{prefix}.{name}" for name in names]
    if not adapted:
        # Frozen towers without adapters are legal (a linear probe), but say so in the key list.
        adapted.append("(frozen towers, no adapter layers)")
    return adapted


def set_encoders_trainable(encoders: Sequence[nn.Module], trainable: bool, adapter_mode: bool) -> None:
    """Freeze or unfreeze encoders; in adapter mode only the LoRA matrices change, backbones stay frozen."""
    for encoder in encoders:
        if not adapter_mode:
            encoder.requires_grad_(trainable)
            continue
        for name, param in encoder.named_parameters():
            param.requires_grad_(trainable and ".lora_" in f".{name}")
