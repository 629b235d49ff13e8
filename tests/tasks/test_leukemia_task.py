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
from fedvlm.errors import DataError
from fedvlm.tasks import get_task
from fedvlm.tasks.base import read_meta, run_tokenizer
from fedvlm.tasks.leukemia.task import load_records
from fedvlm.tasks.site import ensure_site_data
from fedvlm.tasks.site_store import SiteData


def prepare(tmp_path: Path, overrides: list[str]) -> tuple[Path, list[SiteData]]:
    """The coordinator's preparation, then every client's own (as each client process does)."""
    cfg = load_config("leukemia_demo", overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    task = get_task("leukemia")
    task.prepare(cfg, run_dir)
    clients = 1 if cfg.federation.mode == "centralized" else cfg.federation.num_clients
    sites = [
        ensure_site_data(task.read_site, cfg, run_dir, pid, lambda: run_tokenizer(cfg, run_dir))
        for pid in range(clients)
    ]
    return run_dir, sites


def test_clients_prepare_disjoint_splits_covering_the_data(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, sites = prepare(tmp_path, tiny_overrides)
    seen = [site.splits[split]["index"] for site in sites for split in ("train", "val", "test")]
    assert sorted(torch.cat(seen).tolist()) == list(range(240))  # every sample exactly once
    test = sites[0].test.take(range(len(sites[0].test)))
    assert test["image"].dtype == torch.uint8 and test["image"].shape[1:] == (3, 32, 32)
    assert test["input_ids"].shape[1] == 48
    vocab = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert read_meta(run_dir)["vocab_size"] == len(vocab)
    for site in sites:
        assert [site.counts[s] for s in ("train", "val", "test")] == [
            len(site.splits[s]["index"]) for s in ("train", "val", "test")
        ]


def test_a_client_renders_exactly_the_generator_rows_it_holds(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from fedvlm.tasks.leukemia.records import prepare_bundle
    from fedvlm.tasks.leukemia.synthetic import generate_leukemia
    from fedvlm.tasks.leukemia.task import synthetic_config

    _run_dir, sites = prepare(tmp_path, tiny_overrides)
    cfg = load_config("leukemia_demo", tiny_overrides)
    everything = prepare_bundle(generate_leukemia(synthetic_config(cfg)), None, 32, 48)
    for site in sites:
        rows = site.train["index"]
        assert torch.equal(site.train.take(range(len(rows)))["image"], everything["image"][rows])
        assert torch.equal(site.train["stage"], everything["stage"][rows])


def test_local_test_splits_are_stratified(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, "data.synthetic.n=600"]
    _, sites = prepare(tmp_path, overrides)
    records = get_task("leukemia").read_site(load_config("leukemia_demo", overrides))
    classes = records.index.classes
    test_index = torch.cat([site.test["index"] for site in sites]).numpy()
    for label in np.unique(classes):
        share = np.isin(np.flatnonzero(classes == label), test_index).mean()
        assert share == pytest.approx(0.2, abs=0.07)


def test_centralized_mode_prepares_a_single_client(tmp_path: Path, tiny_overrides: list[str]) -> None:
    _run_dir, sites = prepare(tmp_path, [*tiny_overrides, "federation.mode=centralized"])
    assert len(sites) == 1 and sites[0].counts["num_samples"] == 240


def test_image_only_model_needs_no_tokenizer(tmp_path: Path, tiny_overrides: list[str]) -> None:
    run_dir, sites = prepare(tmp_path, [*tiny_overrides, "model.modality=image"])
    assert read_meta(run_dir)["vocab_size"] is None and not (run_dir / "tokenizer").exists()
    assert "input_ids" not in sites[0].test


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
