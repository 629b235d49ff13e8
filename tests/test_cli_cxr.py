"""End-to-end for the chest X-ray task: ``main(argv)`` in-process on the CXR demo recipe shrunk to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedvlm.cli import main
from fedvlm.config import load_config
from fedvlm.federation.callback import travelling_keys
from fedvlm.runs import load_checkpoint, read_metrics
from fedvlm.tasks import get_task
from fedvlm.tasks.site_store import client_site
from tests.conftest import CXR_TINY


@pytest.fixture(scope="module")
def cxr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cxr") / "run"
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(run_dir), *CXR_TINY]) == 0
    return run_dir


@pytest.mark.slow
def test_cxr_fit_writes_a_run_directory_with_traffic_and_zero_shot_metrics(cxr_run: Path) -> None:
    rows = read_metrics(cxr_run)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
        assert 0.0 <= row["test/macro_auroc"] <= 1.0
        assert {"test/i2t_recall@5", "test/t2i_recall@5", "val/macro_auroc"} <= set(row)
    meta = json.loads((cxr_run / "data" / "meta.json").read_text())
    partition = json.loads((cxr_run / "partition.json").read_text())
    assert [client["sites"] for client in partition["clients"]] == [["hospital_00"], ["hospital_01"], ["hospital_02"]]
    assert meta["label_names"][-1] == "No Finding"
    assert sorted(p.name for p in (cxr_run / "data").iterdir()) == ["meta.json", "prompts.pt"]
    # every record at exactly one site and split; patients never cross a site's splits
    sites = [client_site(cxr_run, pid) for pid in range(3)]
    held = [i for site in sites for split in ("train", "val", "test") for i in site.splits[split]["index"].tolist()]
    assert sorted(held) == list(range(240))
    assert all(c["test"] > 0 for c in partition["clients"])
    for row in rows:
        assert {f"test/site/client_00{k}/macro_auroc" for k in range(3)} <= set(row)


@pytest.mark.slow
def test_evaluate_writes_zero_shot_retrieval_few_shot_and_loho(cxr_run: Path) -> None:
    argv = [
        "evaluate",
        str(cxr_run),
        "--zero-shot",
        "--retrieval",
        "--few-shot",
        "1,4",
        "--leave-one-hospital-out",
        "--hospitals",
        "2",
        "--loho-rounds",
        "1",
    ]
    assert main(argv) == 0
    eval_dir = cxr_run / "eval"
    zero_shot = json.loads((eval_dir / "zero_shot.json").read_text())
    assert zero_shot["method"] == "prompts" and 0.0 <= zero_shot["macro_auroc"] <= 1.0
    last_row = read_metrics(cxr_run)[-1]
    assert zero_shot["macro_auroc"] == pytest.approx(last_row["test/macro_auroc"])  # same model, same data
    retrieval = json.loads((eval_dir / "retrieval.json").read_text())
    assert retrieval["i2t_recall@1"] <= retrieval["i2t_recall@5"] <= retrieval["i2t_recall@10"] <= 1.0
    few_shot = json.loads((eval_dir / "few_shot.json").read_text())
    assert set(few_shot) == {"1", "4"} and few_shot["4"]["seeds"] == 3
    loho = json.loads((eval_dir / "loho.json").read_text())
    assert set(loho) == {"2"} and loho["2"]["sites"] == ["hospital_02"] and loho["2"]["site"] == "client_002"
    held_out_run = eval_dir / "loho" / "hospital_002"
    rows = read_metrics(held_out_run)
    assert len(rows) == 1 and set(rows[0]["clients"]) == {"0", "1"}  # hospital 2 never trained
    summary = (eval_dir / "summary.md").read_text()
    assert "Leave-one-hospital-out" in summary and "R@5" in summary and "**macro**" in summary


@pytest.mark.slow
def test_prompts_are_configurable_at_evaluation_time(cxr_run: Path) -> None:
    cfg = load_config(cxr_run / "config.yaml")
    before = json.loads((cxr_run / "eval" / "zero_shot.json").read_text()) if (cxr_run / "eval").exists() else None
    prompt = "evaluation.prompts={Cardiomegaly: [big heart, normal heart]}"
    assert main(["evaluate", str(cxr_run), "--zero-shot", prompt]) == 0
    after = json.loads((cxr_run / "eval" / "zero_shot.json").read_text())
    assert after["per_class_auroc"]["Pneumothorax"] == pytest.approx(
        (before or after)["per_class_auroc"]["Pneumothorax"]
    )
    assert cfg.task == "cxr"
    assert main(["evaluate", str(cxr_run), "federation.rounds=3"]) == 2  # only evaluation.* overrides


@pytest.mark.slow
def test_adapter_mode_sends_only_trainable_weights_and_keeps_backbones(tmp_path: Path) -> None:
    full_dir, adapter_dir = tmp_path / "full", tmp_path / "adapters"
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(full_dir), *CXR_TINY]) == 0
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(adapter_dir), *CXR_TINY, "model.adapter.name=lora"]) == 0
    full_rows, adapter_rows = read_metrics(full_dir), read_metrics(adapter_dir)
    assert adapter_rows[0]["bytes_sent"] * 4 < full_rows[0]["bytes_sent"]
    assert adapter_rows[0]["bytes_received"] * 4 < full_rows[0]["bytes_received"]

    cfg = load_config(adapter_dir / "config.yaml")
    task = get_task("cxr")
    torch.manual_seed(cfg.seed)
    initial = task.build_module(cfg, adapter_dir)
    import lightning as L

    L.seed_everything(cfg.seed, verbose=False)
    initial = task.build_module(cfg, adapter_dir)
    trained = load_checkpoint(adapter_dir / "checkpoints" / "last.ckpt")["state_dict"]
    moving = travelling_keys(initial)
    start = initial.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start if k not in moving)  # backbones bit-identical
    assert any(not torch.equal(trained[k], start[k]) for k in moving if ".lora_up" in k)  # adapters trained


@pytest.mark.slow
def test_image_only_baseline_trains_on_labels_and_evaluates_with_its_head(tmp_path: Path) -> None:
    run_dir = tmp_path / "image"
    overrides = [*CXR_TINY, "model.modality=image", "model.image_encoder.name=resnet_micro"]
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(run_dir), *overrides]) == 0
    assert not (run_dir / "tokenizer").exists()
    assert main(["evaluate", str(run_dir), "--zero-shot", "--few-shot", "2"]) == 0
    zero_shot = json.loads((run_dir / "eval" / "zero_shot.json").read_text())
    assert zero_shot["method"] == "image label head"
    assert main(["evaluate", str(run_dir), "--retrieval"]) == 2


def test_cxr_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(tmp_path / "x"), "data.labels=[Pneumonitis]"]) == 2
    assert "data.labels" in capsys.readouterr().out and not (tmp_path / "x").exists()
    assert main(["fit", "--recipe", "cxr_demo", "--out", str(tmp_path / "y"), "data.format=dicom"]) == 2
    assert "data.format='dicom'" in capsys.readouterr().out


def test_data_synth_writes_a_cxr_manifest_that_the_cxr_task_reads(tmp_path: Path) -> None:
    from fedvlm.tasks.cxr.synthetic import SYNTH_CXR_LABELS
    from fedvlm.tasks.cxr.task import load_dataset

    argv = [
        "data",
        "synth",
        "--task",
        "cxr",
        "--out",
        str(tmp_path / "cxr"),
        "--n",
        "30",
        "--size",
        "32",
        "--sites",
        "3",
    ]
    assert main(argv) == 0
    cfg = load_config("cxr_demo", ["data.format=manifest", f"data.root={tmp_path / 'cxr' / 'manifest.csv'}"])
    dataset = load_dataset(cfg)
    assert len(dataset.records) == 30 and tuple(dataset.label_names) == tuple(SYNTH_CXR_LABELS)
    assert {r.site for r in dataset.records} == {"hospital_00", "hospital_01", "hospital_02"}
    assert all(r.report for r in dataset.records)
