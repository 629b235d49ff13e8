"""Differential privacy of a client's local training: record-level DP-SGD (Opacus) and its
accounting.

``fedvlm.privacy`` knows nothing about Flower's apps and messages: the ClientApp
(``fedvlm.federation.client``) calls it around a round's ``Trainer.fit``. Central (update-level)
DP of the federation wraps the server's aggregator (``fedvlm.federation.central_dp``), and uses
this package's accountant. What is guaranteed is in ``docs/privacy.md``.
"""

from __future__ import annotations

from fedvlm.errors import PrivacyBudgetExhausted
from fedvlm.privacy.accountant import PrivacyLedger, compute_epsilon
from fedvlm.privacy.dp import PrivateTraining, check_private_trainable

__all__ = [
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "PrivateTraining",
    "check_private_trainable",
    "compute_epsilon",
]
