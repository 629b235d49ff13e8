"""The CXR task: data without site metadata (MIMIC-CXR) still trains with the demo recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import DictConfig

import fedvlm.tasks.cxr as cxr_task
from fedvlm.config import load_config
from fedvlm.data.cxr_records import CxrDataset
from fedvlm.data.synthetic_cxr import SynthCxrConfig, generate_cxr
from fedvlm.errors import ConfigError
from fedvlm.tasks import get_task


@pytest.fixture
def siteless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic records with the site removed, as a MIMIC-CXR source gives them."""
    dataset = generate_cxr(SynthCxrConfig(n=120, image_size=32, num_sites=3, seed=0))
    records = [dataclasses.replace(r, site=None) for r in dataset.records]

    def load(cfg: DictConfig) -> CxrDataset:
        return CxrDataset(records, dataset.label_names)

    monkeypatch.setattr(cxr_task, "load_dataset", load)


@pytest.mark.usefixtures("siteless")
def test_site_partition_falls_back_when_the_data_have_no_sites(tmp_path: Path) -> None:
    overrides = ["data.image_size=32", "federation.num_clients=3", "data.max_text_length=48"]
    cfg = load_config("cxr_demo", overrides)
    assert cfg.data.partition.name == "site" and cfg.data.partition.site_fallback == "dirichlet"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    meta = get_task("cxr").prepare(cfg, run_dir)
    assert meta["partitioner"] == "dirichlet" and meta["num_clients"] == 3
    assert sum(size["train"] + size["val"] for size in meta["client_sizes"]) == meta["num_train"]

    strict = load_config("cxr_demo", [*overrides, "data.partition.site_fallback=null"])
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises((ConfigError, ValueError), match="site"):
        get_task("cxr").prepare(strict, other)
