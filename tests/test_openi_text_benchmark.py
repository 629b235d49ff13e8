"""Tests of ``benchmarks/openi_text.py`` without its data or weights: the normal/abnormal label
rule, dropped empty reports, the split by report id and one FedAvg round of the head, on tiny
OpenI-format XML reports written into ``tmp_path``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "openi_text.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openi_text_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _report(uid: str, findings: str, impression: str, major: list[str]) -> str:
    mesh = "".join(f"<major>{term}</major>" for term in major)
    return (
        f'<eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
        f'<AbstractText Label="COMPARISON">None.</AbstractText>'
        f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
        f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
        f"</Abstract></Article></MedlineCitation><MeSH>{mesh}</MeSH></eCitation>"
    )


def _write(folder: Path, reports: list[tuple[str, str, str, list[str]]]) -> Path:
    root = folder / "ecgen-radiology"
    root.mkdir(parents=True)
    for n, report in enumerate(reports, start=1):
        (root / f"{n}.xml").write_text(_report(*report))
    return folder


def test_labels_and_dropped_reports(bench: ModuleType, tmp_path: Path) -> None:
    folder = _write(
        tmp_path,
        [
            ("CXR1", "Clear lungs.", "Normal chest.", ["normal"]),
            ("CXR2", "Large heart.", "Cardiomegaly.", ["Cardiomegaly/mild"]),
            ("CXR3", "", "", ["normal"]),  # no text: dropped
            ("CXR4", "", "No acute disease.", ["Normal", " normal "]),
            ("CXR5", "Clear lungs.", "", ["normal", "Granuloma"]),
            ("CXR6", "Clear lungs.", "Normal.", ["No Indexing"]),
        ],
    )

    reports, n_files = bench.load_labelled(folder)

    assert n_files == 6
    assert [(r.uid, r.label) for r in reports] == [("CXR1", 0), ("CXR2", 1), ("CXR4", 0), ("CXR5", 1), ("CXR6", 1)]
    assert reports[0].text == "Clear lungs. Normal chest."
    assert reports[2].text == "No acute disease."
    assert bench.abnormal([]) == 1


def test_missing_archive_names_the_file(bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"NLMCXR_reports\.tgz"):
        bench.extract_reports(tmp_path / "NLMCXR_reports.tgz", tmp_path)


def test_split_by_id(bench: ModuleType) -> None:
    uids = [f"CXR{n}" for n in range(1, 201)]

    sites, test = bench.split_by_id(uids, seed=0)

    assert len(sites) == 5
    assert len(test) == 40
    assert all(len(site) == 32 for site in sites)
    every = [uid for site in sites for uid in site] + test
    assert len(every) == len(set(every)) and set(every) == set(uids)
    assert bench.split_by_id(list(reversed(uids)), seed=0) == (sites, test)  # the id set decides, not its order
    assert bench.split_by_id(uids, seed=1) != (sites, test)


def test_one_federated_round_is_the_weighted_mean(bench: ModuleType) -> None:
    torch.manual_seed(0)
    config = bench.HeadConfig(hidden=0, lr=0.05)
    sites = [(torch.randn(n, 4), torch.randint(0, 2, (n,)).float()) for n in (10, 30)]

    head, history = bench.federate(sites, rounds=1, local_epochs=1, config=config, seed=3)

    torch.manual_seed(3)
    start = bench.make_head(4, config).state_dict()
    local = []
    for partition_id, (x, y) in enumerate(sites):
        model = bench.make_head(4, config)
        model.load_state_dict(start)
        bench.train_head(model, x, y, 1, config, seed=3 * 100_003 + 101 + partition_id)
        local.append(model.state_dict())
    expected = (10 * local[0]["weight"] + 30 * local[1]["weight"]) / 40
    assert torch.allclose(head.state_dict()["weight"], expected, atol=1e-6)
    assert history == []
    assert np.isfinite(bench.scores(head, sites[0][0])).all()
