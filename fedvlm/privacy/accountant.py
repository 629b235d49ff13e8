"""A client's privacy ledger: the DP-SGD history of all its rounds, kept on its own disk.

A client may train each round in a fresh process (Flower's deployment engine), so Opacus'
accountant cannot live in memory. After every round the client appends that round's history
``[(σ, q, steps)]`` to ``privacy/accountant.pt`` in its folder; before the next round the
accountant is rebuilt from all entries. ε is therefore cumulative over every round the client
trained in, as composition requires (Flower's Opacus example starts a new engine each round and
reports the ε of one round only).

**Re-run rounds count twice.** When a run fails in round ``r`` after this client trained and
answered, and ``fedvlm fit --resume`` runs round ``r`` again, the ledger keeps both entries of
round ``r``. The first update left the site (the server received it before the round failed),
and the re-run draws fresh noise and a fresh Poisson sample, so it is a second release of the
same records; dropping the first entry would under-report ε. The cost is over-reporting in the
one case where the entry was written but the reply never left (a crash between the two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import IAccountant, create_accountant

HistoryEntry = tuple[float, float, int]
"""One Opacus history entry: (noise multiplier σ, sample rate q, number of steps)."""

LEDGER_FORMAT = 1


def make_accountant(mechanism: str, history: Sequence[HistoryEntry] = ()) -> IAccountant:
    """An Opacus accountant (``rdp``/``prv``) holding ``history``."""
    accountant = create_accountant(mechanism=mechanism)
    accountant.load_state_dict({"history": [tuple(entry) for entry in history], "mechanism": accountant.mechanism()})
    return accountant


def compute_epsilon(mechanism: str, history: Sequence[HistoryEntry], delta: float) -> float:
    """ε at ``delta`` of the composition of ``history`` (0 for no step), by Opacus' accountant.

    Example:
        >>> round(compute_epsilon("rdp", [(1.0, 0.25, 8)], 1e-5), 2)
        6.25
    """
    if sum(int(steps) for _, _, steps in history) == 0:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


@dataclass
class LedgerEntry:
    """What one round of local DP-SGD spent.

    Attributes:
        server_round: The round this training answered (a re-run round appears twice).
        history: The round's Opacus history ``[(σ, q, steps)]``.
        epsilon: Cumulative ε after this round, at ``delta``.
        delta: δ of ``epsilon``.
        mechanism: The accountant that computed ``epsilon``.
    """

    server_round: int
    history: list[HistoryEntry]
    epsilon: float
    delta: float
    mechanism: str


class PrivacyLedger:
    """The ordered DP-SGD history of one client, persisted to ``path``.

    Args:
        path: The ledger file (``RunLayout(run_dir).ledger(partition_id)``); need not exist.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[LedgerEntry] = []
        if path.is_file():
            saved: dict[str, Any] = torch.load(path, weights_only=True)
            if saved.get("format") != LEDGER_FORMAT:
                raise ValueError(f"{path}: unknown privacy ledger format {saved.get('format')!r}")
            self.entries = [
                LedgerEntry(**{**entry, "history": [tuple(h) for h in entry["history"]]}) for entry in saved["entries"]
            ]

    def history(self) -> list[HistoryEntry]:
        """All rounds' entries, in order: what the accountant composes."""
        return [entry for round_entry in self.entries for entry in round_entry.history]

    def epsilon(self, mechanism: str, delta: float, planned: Sequence[HistoryEntry] = ()) -> float:
        """ε spent so far, or after ``planned`` further steps, at ``delta``."""
        return compute_epsilon(mechanism, [*self.history(), *planned], delta)

    def record(self, server_round: int, history: Sequence[HistoryEntry], mechanism: str, delta: float) -> float:
        """Append a round's history, save atomically, and return the cumulative ε."""
        entry = LedgerEntry(server_round, [tuple(h) for h in history], 0.0, delta, mechanism)  # type: ignore[misc]
        self.entries.append(entry)
        entry.epsilon = self.epsilon(mechanism, delta)
        self.save()
        return entry.epsilon

    def save(self) -> None:
        """Write the ledger (temporary file, then rename: a crash leaves the previous ledger)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        accountant_state = {"history": self.history(), "mechanism": self.entries[-1].mechanism if self.entries else ""}
        torch.save(
            {
                "format": LEDGER_FORMAT,
                "entries": [asdict(entry) for entry in self.entries],
                "accountant": accountant_state,  # Opacus' accountant.state_dict() of the whole history
            },
            tmp,
        )
        tmp.replace(self.path)
