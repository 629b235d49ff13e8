"""End-to-end: the CLI's ``main(argv)`` in-process, on the demo recipe shrunk to seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedvlm.cli import main
from fedvlm.config import load_config
from fedvlm.data.prepared import make_loader
from fedvlm.runs import load_checkpoint, read_metrics
from fedvlm.tasks import get_task
from fedvlm.tasks.leukemia.manifest import read_manifest
from fedvlm.tasks.leukemia.module import LeukemiaModule
from fedvlm.tasks.site_store import client_site

REQUIRED_KEYS = {
    "round",
    "test/accuracy",
    "test/auroc",
    "test/stage_macro_f1",
    "test/stage_macro_precision",
    "test/stage_macro_recall",
    "train/loss",
    "round_seconds",
    "bytes_sent",
    "bytes_received",
    "update_norm",
}


@pytest.mark.slow
def test_fit_demo_recipe_writes_a_complete_run_directory(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *tiny_overrides]) == 0

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.federation.rounds == 2 and cfg.data.synthetic.n == 240 and cfg.recipe == "leukemia_demo"

    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) >= REQUIRED_KEYS
        assert 0.0 <= row["test/auroc"] <= 1.0 and row["update_norm"] > 0
        assert row["bytes_sent"] > row["bytes_received"] > 0  # full model down, trainable keys up
        assert set(row["clients"]) == {"0", "1", "2"} and row["failed_clients"] == {}

    partition = json.loads((run_dir / "partition.json").read_text())
    clients = partition["clients"]
    assert [c["site"] for c in clients] == ["client_000", "client_001", "client_002"]
    assert sum(c["num_samples"] for c in clients) == 240  # every sample at exactly one site
    assert all(c["num_samples"] == c["train"] + c["val"] + c["test"] for c in clients)
    assert partition["test"]["num_samples"] == sum(c["test"] for c in clients) == pytest.approx(0.2 * 240, abs=9)
    assert set(clients[0]["by_label"]) == {
        "negative",
        "stage_I",
        "stage_II",
        "stage_III",
        "stage_IV",
        "positive_unknown_stage",
    }
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["meta.json"]  # no sample on the coordinator
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:  # per-site test metrics beside the pooled ones
        assert {f"test/site/client_00{k}/accuracy" for k in range(3)} <= set(row)

    # best.ckpt is the round with the best merged validation stage macro-F1; its pooled test
    # metrics are those of the union of the sites' test splits.
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["fedvlm"]
    best_row = max(rows, key=lambda r: r["val/stage_macro_f1"])
    assert best["best_round"] == best_row["round"]
    module = LeukemiaModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    task = get_task("leukemia")
    tests = [client_site(run_dir, k).test for k in range(3)]
    union = {
        key: torch.cat([split.take(range(len(split)))[key] for split in tests])
        for key in ("image", "input_ids", "attention_mask", "leukemia", "stage", "index")
    }
    exact = task.make_metrics(cfg, mergeable=False)
    task.evaluate(module, make_loader(union, 16, shuffle=False), exact)
    exact_values = task.scalar_metrics(exact)
    assert exact_values["accuracy"] == pytest.approx(best_row["test/accuracy"])
    assert exact_values["stage_macro_f1"] == pytest.approx(best_row["test/stage_macro_f1"])
    assert exact_values["auroc"] == pytest.approx(best_row["test/auroc"], abs=0.01)  # binned thresholds
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["fedvlm"]["completed_round"] == 2


@pytest.mark.slow
def test_resume_after_a_failed_round_equals_an_uninterrupted_run(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, "federation.rounds=3", "federation.min_clients=3"]
    straight = tmp_path / "straight"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(straight), *overrides]) == 0

    broken = tmp_path / "broken"
    # Every client fails in round 3: the run stops with progress of rounds 1-2 kept.
    faults = "federation.faults=[0@3,1@3,2@3]"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(broken), *overrides, faults]) == 2
    assert [row["round"] for row in read_metrics(broken)] == [1, 2]
    assert main(["fit", "--resume", str(broken), "federation.faults=[]"]) == 0

    expected = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint(broken / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)
    volatile = {"round_seconds", "clients"}
    for row_a, row_b in zip(read_metrics(straight), read_metrics(broken), strict=True):
        assert {k: v for k, v in row_a.items() if k not in volatile} == {
            k: v for k, v in row_b.items() if k not in volatile
        }


@pytest.mark.slow
def test_a_failing_client_is_reported_and_left_out(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *tiny_overrides, "federation.faults=[1@1]"])
    assert code == 0
    first, second = read_metrics(run_dir)
    assert first["num_clients"] == 2 and set(first["failed_clients"]) == {"1"}
    assert "injected failure of client 1 in round 1" in first["failed_clients"]["1"]
    assert "1" not in {k for k, v in first["clients"].items() if "train/loss" in v}
    assert second["num_clients"] == 3 and second["failed_clients"] == {}
    assert "failed: 1 (injected failure" in capsys.readouterr().out


@pytest.mark.slow
def test_too_few_clients_stop_the_run_naming_them(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    code = main(
        [
            "fit",
            "--recipe",
            "leukemia_demo",
            "--out",
            str(run_dir),
            *tiny_overrides,
            "federation.min_clients=3",
            "federation.faults=[2@1]",
        ]
    )
    assert code == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "round 1: only 2 of 3 clients answered (federation.min_clients=3); client 2: injected failure" in out
    assert "fedvlm fit --resume" in out


@pytest.mark.slow
def test_centralized_baseline_trains_one_client_on_the_pooled_data(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "central"
    assert (
        main(
            ["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *tiny_overrides, "federation.mode=centralized"]
        )
        == 0
    )
    partition = json.loads((run_dir / "partition.json").read_text())
    assert len(partition["clients"]) == 1 and partition["clients"][0]["num_samples"] == 240
    assert [row["num_clients"] for row in read_metrics(run_dir)] == [1, 1]
    # the pooled client holds exactly the union of the federated clients' local splits
    federated = load_config("leukemia_demo", tiny_overrides)
    central = load_config(run_dir / "config.yaml")
    task = get_task("leukemia")
    records = task.read_site(federated)
    from fedvlm.data.sites import client_source
    from fedvlm.tasks.site import client_rows

    for split in ("train", "val", "test"):
        union = sorted(
            int(i) for k in range(3) for i in client_rows(federated, client_source(federated, k), records.index)[split]
        )
        assert client_site(run_dir, 0).splits[split]["index"].tolist() == union
    assert central.federation.num_clients == 3


@pytest.mark.slow
def test_missing_data_at_a_site_exits_2_naming_the_site_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_data"
    overrides = ["data.format=manifest", f"data.root={missing}", "federation.num_clients=2"]
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *overrides]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert str(missing) in out and re.search(r"site client_00[01]: ", out)  # the client reading it names itself
    assert not run_dir.exists()  # no round completed: nothing half-written stays behind


def test_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["fit", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().out
    assert main(["fit", "--recipe", "leukemia_demo", "federation.roundz=2"]) == 2
    assert "Key 'roundz' not in 'FederationConfig'" in capsys.readouterr().out
    # Unknown component names fail before any data is prepared.
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), "federation.strategy=fedsgd"]) == 2
    unknown = "federation.strategy: unknown strategy 'fedsgd'; valid names: fedavg, fedavgm, fedprox"
    assert unknown in capsys.readouterr().out
    assert not run_dir.exists()


def test_resume_refuses_changes_to_what_shaped_the_run(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from fedvlm.config import save_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config("leukemia_demo", tiny_overrides), run_dir / "config.yaml")
    before = (run_dir / "config.yaml").read_text()
    assert main(["fit", "--resume", str(run_dir), "federation.num_clients=4"]) == 2
    assert "federation.num_clients cannot change on --resume" in " ".join(capsys.readouterr().out.split())
    assert (run_dir / "config.yaml").read_text() == before  # the saved config is untouched


def test_recipes_command_lists_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "leukemia_demo" in out and "leukemia " in out


def test_data_synth_writes_a_readable_manifest(tmp_path: Path) -> None:
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "40", "--size", "48", "--sites", "2"]) == 0
    records = read_manifest(tmp_path / "manifest.csv")
    assert len(records) == 40 and {r.site for r in records} == {"site00", "site01"}
    assert all(r.report for r in records)


@pytest.mark.slow
def test_sampling_freeze_fedprox_and_codec_compose_in_one_run(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--recipe",
                "leukemia_demo",
                "--out",
                str(run_dir),
                *tiny_overrides,
                "federation.clients_per_round=2",
                "federation.freeze_encoders_rounds=1",
                "federation.strategy=fedprox",
                "federation.strategy.mu=0.1",
                "federation.codec=fp16",
            ]
        )
        == 0
    )
    first, second = read_metrics(run_dir)
    assert [first["encoders_frozen"], second["encoders_frozen"]] == [True, False]
    assert first["num_clients"] == second["num_clients"] == 2
    # Frozen encoders stay home: round 1 uploads only fusion + heads, a small share of round 2.
    assert first["bytes_received"] < 0.2 * second["bytes_received"]
    cfg = load_config(run_dir / "config.yaml")
    initial = get_task("leukemia").build_module(cfg, run_dir)
    after = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(after[k], v) for k, v in initial.state_dict().items() if k.startswith("image_encoder"))


@pytest.mark.slow
def test_convergence_stop_ends_the_run_early(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "federation.rounds=3", "federation.convergence_tol=1e9"]
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *overrides]) == 0
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and rows[0]["converged"] is True and rows[0]["update_norm"] < 1e9
