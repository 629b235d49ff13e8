"""The leukemia task's data preparation: split, partition, shards, tokenizer, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvlm.config import load_config
from fedvlm.data.images import write_image
from fedvlm.data.prepared import load_bundle
from fedvlm.errors import DataError
from fedvlm.tasks import get_task
from fedvlm.tasks.leukemia import label_classes, load_records


def prepare(tmp_path: Path, overrides: list[str]) -> tuple[Path, dict]:
    cfg = load_config("leukemia_demo", overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    meta = get_task("leukemia").prepare(cfg, run_dir)
    return run_dir, meta


def test_prepare_writes_disjoint_shards_covering_the_data(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, meta = prepare(tmp_path, tiny_overrides)
    test = load_bundle(run_dir / "data" / "test.pt")
    seen = [test["index"]]
    for client in range(3):
        for split in ("train", "val"):
            seen.append(load_bundle(run_dir / "data" / f"client_{client:03d}_{split}.pt")["index"])
    everything = torch.cat(seen)
    assert sorted(everything.tolist()) == list(range(240))  # every sample exactly once
    assert meta["num_test"] == len(test["index"]) and meta["num_train"] + meta["num_test"] == 240
    assert test["image"].dtype == torch.uint8 and test["image"].shape[1:] == (3, 32, 32)
    assert test["input_ids"].shape[1] == 48
    vocab = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert meta["vocab_size"] == len(vocab)


def test_test_split_is_stratified_and_never_trained_on(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, _ = prepare(tmp_path, [*tiny_overrides, "data.synthetic.n=600"])
    cfg = load_config("leukemia_demo", [*tiny_overrides, "data.synthetic.n=600"])
    classes = label_classes(load_records(cfg), 4)
    test_index = load_bundle(run_dir / "data" / "test.pt")["index"].numpy()
    for label in np.unique(classes):
        share = np.isin(np.flatnonzero(classes == label), test_index).mean()
        assert share == pytest.approx(0.2, abs=0.05)
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["test"]["num_samples"] == len(test_index)


def test_centralized_mode_prepares_a_single_client(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, meta = prepare(tmp_path, [*tiny_overrides, "federation.mode=centralized"])
    assert meta["num_clients"] == 1 and not (run_dir / "data" / "client_001_train.pt").exists()


def test_image_only_model_needs_no_tokenizer(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, meta = prepare(tmp_path, [*tiny_overrides, "model.modality=image"])
    assert meta["vocab_size"] is None and not (run_dir / "tokenizer").exists()
    assert "input_ids" not in load_bundle(run_dir / "data" / "test.pt")


def write_all_idb2(root: Path, labels: list[int]) -> None:
    (root / "img").mkdir(parents=True)
    for index, label in enumerate(labels, start=1):
        write_image(root / "img" / f"Im{index:03d}_{label}.tif", np.full((8, 8, 3), 40 * index % 255, np.uint8))


def test_image_only_source_with_a_fused_model_fails_naming_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "ALL_IDB2"
    write_all_idb2(root, [1, 0, 1, 0])
    cfg = load_config("leukemia_demo", [f"data.root={root}"])
    with pytest.raises(DataError, match=r"empty report .*give data.reports="):
        load_records(cfg)
    image_only = load_config("leukemia_demo", [f"data.root={root}", "model.modality=image"])
    assert [r.leukemia for r in load_records(image_only)] == [1, 0, 1, 0]  # layout recognised


def test_reports_csv_joins_narratives_to_all_idb_images(tmp_path: Path) -> None:
    root = tmp_path / "ALL_IDB2"
    write_all_idb2(root, [1, 0])
    reports = tmp_path / "reports.csv"
    with reports.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report", "stage"])
        writer.writerow(["Im001_1.tif", "blasts 45% on smear", "III"])
        writer.writerow(["Im002_0.tif", "no blasts seen", ""])
    cfg = load_config("leukemia_demo", [f"data.root={root}", f"data.reports={reports}"])
    records = load_records(cfg)
    assert [(r.report, r.stage) for r in records] == [("blasts 45% on smear", 2), ("no blasts seen", None)]
