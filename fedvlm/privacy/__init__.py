"""Differential privacy: record-level DP-SGD of a client's local training (Opacus), its
accounting, and central (update-level) DP of the federation (DP-FedAvg).

``fedvlm.privacy`` knows nothing about Flower's apps and messages: the ClientApp
(``fedvlm.federation.client``) calls it around a round's ``Trainer.fit``, and the server and
client call ``fedvlm.privacy.central`` on state dicts (which reuses Flower's DP math helpers
only). What is guaranteed is in ``docs/privacy.md``.
"""

from __future__ import annotations

from fedvlm.privacy.accountant import PrivacyLedger, compute_epsilon
from fedvlm.privacy.central import (
    add_central_noise,
    central_epsilon,
    check_central_strategy,
    clip_update,
    uniform_mean,
)
from fedvlm.privacy.dp import (
    PrivacyBudgetExhausted,
    PrivateTraining,
    check_private_trainable,
    ledger_path,
)

__all__ = [
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "PrivateTraining",
    "add_central_noise",
    "central_epsilon",
    "check_central_strategy",
    "check_private_trainable",
    "clip_update",
    "compute_epsilon",
    "ledger_path",
    "uniform_mean",
]
