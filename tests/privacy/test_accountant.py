"""The privacy ledger: ε equals Opacus' own accountant, is cumulative, and survives a new process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedvlm.privacy import PrivacyBudgetExhausted, PrivacyLedger, PrivateTraining, compute_epsilon
from fedvlm.runs import RunLayout

ROUNDS = [[(1.1, 0.25, 8)], [(1.1, 0.25, 8)], [(0.9, 0.2, 10)]]
PRIVACY = {
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "delta": 1e-5,
    "accountant": "rdp",
    "max_epsilon": None,
    "poisson_sampling": True,
    "grad_sample_mode": "hooks",
}


def opacus_epsilon(accountant: RDPAccountant | PRVAccountant, rounds: list[list[tuple[float, float, int]]]) -> float:
    """The reference: Opacus' accountant stepped once per optimizer step, as DPOptimizer does."""
    for history in rounds:
        for sigma, q, steps in history:
            for _ in range(steps):
                accountant.step(noise_multiplier=sigma, sample_rate=q)
    return float(accountant.get_epsilon(delta=1e-5))


@pytest.mark.parametrize(("mechanism", "accountant"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_ledger_epsilon_equals_opacus_accountant(tmp_path: Path, mechanism: str, accountant: type) -> None:
    ledger = PrivacyLedger(tmp_path / "accountant.pt")
    reported = [ledger.record(r, history, mechanism, 1e-5) for r, history in enumerate(ROUNDS, start=1)]
    assert reported[-1] == pytest.approx(opacus_epsilon(accountant(), ROUNDS), rel=1e-9)
    assert reported[0] < reported[1] < reported[2]  # cumulative over rounds, never per round
    assert reported[0] == pytest.approx(compute_epsilon(mechanism, ROUNDS[0], 1e-5))


def test_ledger_survives_a_fresh_process(tmp_path: Path) -> None:
    path = RunLayout(tmp_path).ledger(2)
    assert path == tmp_path / "clients" / "client_002" / "privacy" / "accountant.pt"
    ledger = PrivacyLedger(path)
    for r, history in enumerate(ROUNDS[:2], start=1):
        expected = ledger.record(r, history, "rdp", 1e-5)
    code = (
        "import sys; from pathlib import Path; from fedvlm.privacy import PrivacyLedger; "
        "ledger = PrivacyLedger(Path(sys.argv[1])); print(repr(ledger.epsilon('rdp', 1e-5)), ledger.history())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    epsilon, history = out.split(" ", 1)
    assert float(epsilon) == expected
    assert history.strip() == str(ROUNDS[0] + ROUNDS[1])
    saved = PrivacyLedger(path)
    assert [e.server_round for e in saved.entries] == [1, 2] and saved.entries[-1].epsilon == expected


def test_a_rerun_round_counts_again(tmp_path: Path) -> None:
    """A round re-run after a failure released a second, differently noised update: both count."""
    ledger = PrivacyLedger(tmp_path / "accountant.pt")
    ledger.record(1, ROUNDS[0], "rdp", 1e-5)
    ledger.record(2, ROUNDS[1], "rdp", 1e-5)  # the run then failed in round 2 and was resumed
    again = PrivacyLedger(tmp_path / "accountant.pt").record(2, ROUNDS[1], "rdp", 1e-5)
    assert again == pytest.approx(opacus_epsilon(RDPAccountant(), [ROUNDS[0], ROUNDS[1], ROUNDS[1]]))


def test_budget_check_refuses_a_round_that_would_exceed_max_epsilon(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "accountant.pt")
    spent = ledger.record(1, [(1.0, 0.25, 4)], "rdp", 1e-5)
    private = PrivateTraining({**PRIVACY, "max_epsilon": spent + 0.1}, ledger, 2, "client 7")
    private.sample_rate, private.planned_steps = 0.25, 4
    with pytest.raises(PrivacyBudgetExhausted, match=r"^privacy budget exhausted: client 7 has spent ε=4\.87") as err:
        private.check_budget()
    assert "privacy.max_epsilon=4.97" in str(err.value) and "round 2's 4 steps" in str(err.value)
    assert PrivacyBudgetExhausted.raised_in(f"ClientApp raised: {err.value}")  # how the server recognises it
    private.max_epsilon = 7.0
    assert private.check_budget() == pytest.approx(compute_epsilon("rdp", [(1.0, 0.25, 8)], 1e-5))
