"""Differential privacy of a client's local training (DP-SGD with Opacus) and its accounting.

``fedvlm.privacy`` knows nothing about Flower: the ClientApp (``fedvlm.federation.client``)
calls it around a round's ``Trainer.fit``. What is guaranteed is in ``docs/privacy.md``.
"""

from __future__ import annotations

from fedvlm.privacy.accountant import PrivacyLedger, compute_epsilon
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
    "check_private_trainable",
    "compute_epsilon",
    "ledger_path",
]
