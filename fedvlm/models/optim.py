"""The local optimiser every fedvlm LightningModule builds from the ``optim`` config section."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], optim: Mapping[str, Any], learning_rate: float
) -> torch.optim.Optimizer:
    """SGD with momentum (``name: sgd``, the papers' choice) or AdamW, over the trainable parameters.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> type(build_optimizer(layer.parameters(), {"name": "adamw", "weight_decay": 0.0}, 0.1)).__name__
        'AdamW'
    """
    trainable = [p for p in parameters if p.requires_grad]
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            trainable, lr=learning_rate, momentum=float(optim["momentum"]), weight_decay=float(optim["weight_decay"])
        )
    return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=float(optim["weight_decay"]))
