"""End-to-end: ``fedvlm fit`` with ``privacy.dp=true`` accounts ε over rounds and stops at the budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedvlm.cli import main
from fedvlm.privacy import PrivacyLedger, compute_epsilon
from fedvlm.runs import RunLayout, read_metrics

DP = ["privacy.dp=true", "trainer.local_epochs=1", "federation.evaluate_clients=false"]


@pytest.mark.slow
def test_epsilon_accumulates_over_rounds_and_the_budget_stops_the_run(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    straight = tmp_path / "straight"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(straight), *tiny_overrides, *DP]) == 0
    first, second = read_metrics(straight)
    for pid, client in first["clients"].items():
        epsilon_1, epsilon_2 = client["privacy/epsilon"], second["clients"][pid]["privacy/epsilon"]
        assert 0 < epsilon_1 < epsilon_2  # cumulative over rounds
        # What the client reported is Opacus' RDP accountant over its (σ, q, steps) history:
        # q = 1/⌈N/batch⌉ and one epoch of 1/q Poisson batches per round.
        batches = -(-client["num_examples"] // 16)
        assert epsilon_2 == pytest.approx(compute_epsilon("rdp", [(1.0, 1 / batches, 2 * batches)], 1e-5))
        ledger = PrivacyLedger(RunLayout(straight).ledger(int(pid)))
        assert [e.server_round for e in ledger.entries] == [1, 2] and ledger.entries[-1].epsilon == epsilon_2
    assert first["privacy/epsilon_max"] == max(c["privacy/epsilon"] for c in first["clients"].values())

    # A budget between the round-1 and round-2 ε: round 2 is refused and the run stops.
    budget = (first["privacy/epsilon_max"] + second["privacy/epsilon_max"]) / 2
    stopped = tmp_path / "stopped"
    code = main(
        [
            "fit",
            "--recipe",
            "leukemia_demo",
            "--out",
            str(stopped),
            *tiny_overrides,
            *DP,
            f"privacy.max_epsilon={budget}",
        ]
    )
    assert code == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "round 2: stopped, privacy budget exhausted" in out and f"privacy.max_epsilon={budget:g}" in out
    assert [row["round"] for row in read_metrics(stopped)] == [1]

    # Resumed with a larger budget, the ledgers carry on: ε of round 2 is cumulative again.
    assert main(["fit", "--resume", str(stopped), "privacy.max_epsilon=null"]) == 0
    resumed = read_metrics(stopped)
    assert [row["round"] for row in resumed] == [1, 2]
    for pid, client in resumed[1]["clients"].items():
        rounds = [e.server_round for e in PrivacyLedger(RunLayout(stopped).ledger(int(pid))).entries]
        if rounds == [1, 2]:  # refused in the stopped run: nothing of round 2 was spent then
            assert client["privacy/epsilon"] == pytest.approx(second["clients"][pid]["privacy/epsilon"])
        else:  # trained and answered round 2 before the stop: that release counts too
            assert rounds == [1, 2, 2]
