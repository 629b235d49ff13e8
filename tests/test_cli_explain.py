"""End-to-end: SHAP explanations on each client during training, and ``fedvlm explain`` afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedvlm.cli import main
from fedvlm.runs import read_metrics
from fedvlm.tasks.site_store import client_site

EXPLAIN = ["explain.enabled=true", "explain.patients=2", "explain.max_evals=40"]


@pytest.mark.slow
def test_clients_explain_locally_and_share_only_aggregates(tmp_path: Path, tiny_overrides: list[str]) -> None:
    shared, private = tmp_path / "shared", tmp_path / "private"
    assert (
        main(
            [
                "fit",
                "--recipe",
                "leukemia_demo",
                "--out",
                str(shared),
                *tiny_overrides,
                *EXPLAIN,
                "explain.share_summary=true",
            ]
        )
        == 0
    )
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(private), *tiny_overrides, *EXPLAIN]) == 0

    for run_dir in (shared, private):
        for client in range(3):
            for server_round in (1, 2):
                folder = run_dir / "clients" / f"client_{client:03d}" / "explanations" / f"round_{server_round:03d}"
                summary = json.loads((folder / "summary.json").read_text())
                assert summary["explain/patients"] == 2
                assert summary["explain/efficiency_error_max"] < 1e-4  # Σφ = f(x) − f(baseline)
                assert (folder / "index.html").is_file()
                assert len(list(folder.glob("*.json"))) == 3  # two patients + the summary
    shared_rows, private_rows = read_metrics(shared), read_metrics(private)
    assert "explain/sparsity" in shared_rows[0] and "explain/consistency" in shared_rows[1]
    assert "explain/sparsity" in shared_rows[1]["clients"]["0"]
    assert not any(key.startswith("explain/") for row in private_rows for key in row)
    assert not any(key.startswith("explain/") for row in private_rows for c in row["clients"].values() for key in c)


@pytest.mark.slow
def test_explain_command_writes_patients_and_ground_truth_agreement(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *tiny_overrides]) == 0
    test = client_site(run_dir, 0).test  # `fedvlm explain` explains client 0's test patients by default
    positives = test["index"][test["leukemia"] == 1][:3].tolist()  # they have blasts to point at
    patients = ",".join(str(i) for i in positives)
    assert main(["explain", str(run_dir), "--patients", patients, "explain.max_evals=40"]) == 0
    folder = run_dir / "explanations" / "round_002"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["explain/patients"] == 3
    assert {f"{i:05d}.json" for i in positives} <= {p.name for p in folder.glob("*.json")}
    assert 0.0 < summary["explain/image_blast_chance"] < 1.0  # the generator's ground truth is used
    assert 0.0 <= summary["explain/image_blast_hit_rate"] <= 1.0
    assert main(["explain", str(run_dir), "--patients", "999999"]) == 2
    assert main(["explain", str(run_dir), "federation.rounds=3"]) == 2
