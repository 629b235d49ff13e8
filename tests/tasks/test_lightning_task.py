"""``task: lightning``: a plain LightningModule and LightningDataModule, written here, federated by ``fedvlm fit``.

Neither class knows fedvlm: the module has its own optimiser (and a learning rate the round's
schedule overrides), the DataModule reads one site's file. The test copies this file next to its
data so that the simulation's client processes import the classes by their dotted path.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

MODULE = "byo_lightning_case"
SITE_SIZES = {"site_a": (6, 2, 3), "site_b": (10, 3, 4)}  # train, val, test


class TinyRegression(L.LightningModule):
    """Linear regression from zero weights, trained with its own SGD."""

    def __init__(self, in_features: int = 3) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        mse = torch.nn.functional.mse_loss(self.linear(x), y)
        self.log("val/mse", mse, batch_size=len(x))
        self.log("val/score", -mse, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=123.0)  # the round's learning rate replaces it


class SiteFiles(L.LightningDataModule):
    """One site's samples from its own file, ``site["root"]``: train, then val, then test rows."""

    def __init__(self, site: dict[str, Any]) -> None:
        super().__init__()
        self.site = site

    def setup(self, stage: str) -> None:
        data = torch.load(self.site["root"])
        x, y, (train, val, _) = data["x"], data["y"], data["sizes"]
        self.parts = {
            "train": TensorDataset(x[:train], y[:train]),
            "val": TensorDataset(x[train : train + val], y[train : train + val]),
            "test": TensorDataset(x[train + val :], y[train + val :]),
        }

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.parts["train"], batch_size=4)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.parts["val"], batch_size=4)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.parts["test"], batch_size=4)


def write_sites(root: Path) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(0)
    entries = []
    for name, sizes in SITE_SIZES.items():
        x = torch.randn(sum(sizes), 3, generator=generator)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + (1.0 if name == "site_a" else -1.0)
        torch.save({"x": x, "y": y, "sizes": sizes}, root / f"{name}.pt")
        entries.append({"name": name, "root": str(root / f"{name}.pt")})
    return entries


def local_training(site: dict[str, Any], epochs: int, lr: float) -> dict[str, torch.Tensor]:
    """What one client does in round 1, by hand: zero weights, ``epochs`` of SGD at ``lr``."""
    module = TinyRegression()
    optimiser = torch.optim.SGD(module.parameters(), lr=lr)
    data = SiteFiles(site)
    data.setup("fit")
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            optimiser.zero_grad()
            torch.nn.functional.mse_loss(module.linear(x), y).backward()
            optimiser.step()
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """This file as module ``byo_lightning_case``, importable here and in the simulation's workers."""
    shutil.copy(__file__, tmp_path / f"{MODULE}.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    yield MODULE
    sys.modules.pop(MODULE, None)


def test_a_plain_module_and_datamodule_federate_to_the_fedavg_of_their_local_weights(
    tmp_path: Path, importable: str
) -> None:
    from fedvlm.cli import main
    from fedvlm.runs import load_checkpoint

    entries = write_sites(tmp_path)
    recipe = tmp_path / "byo.yaml"
    recipe.write_text(
        "task: lightning\n"
        f"model: {{module_class: {importable}.TinyRegression, module_options: {{in_features: 3}}}}\n"
        f"data: {{datamodule_class: {importable}.SiteFiles, sites: {json.dumps(entries)}}}\n"
        "evaluation: {select_metric: score}\n"
        "optim: {name: sgd, lr: 0.05, lr_schedule: constant, momentum: 0.0, weight_decay: 0.0}\n"
        "trainer: {local_epochs: 2}\n"
        "federation: {strategy: fedavg, rounds: 1}\n"
    )
    run_dir = tmp_path / "run"
    assert main(["fit", "--recipe", str(recipe), "--out", str(run_dir)]) == 0

    partition = json.loads((run_dir / "partition.json").read_text())
    assert [(c["site"], c["train"], c["val"], c["test"]) for c in partition["clients"]] == [
        (name, *sizes) for name, sizes in SITE_SIZES.items()
    ]
    # after one round the global weights are the FedAvg of the two locally trained ones
    local = [local_training(entry, epochs=2, lr=0.05) for entry in entries]
    weights = [SITE_SIZES[e["name"]][0] for e in entries]
    expected = {k: sum(w * s[k] for w, s in zip(weights, local, strict=True)) / sum(weights) for k in local[0]}
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(local[0]["linear.weight"], local[1]["linear.weight"])  # the sites differ

    # federated test metrics: what validation_step logs, merged as the sample-weighted mean over sites
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = TinyRegression()
    model.load_state_dict(state)
    errors, sizes = [], []
    for entry in entries:
        data = SiteFiles(entry)
        data.setup("test")
        x, y = data.parts["test"].tensors
        errors.append(float(torch.nn.functional.mse_loss(model.linear(x), y)) * len(x))
        sizes.append(len(x))
    assert row["test/mse"] == pytest.approx(sum(errors) / sum(sizes), rel=1e-5)
    assert row["val/score"] == pytest.approx(-row["val/mse"])
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


def test_task_lightning_refuses_what_needs_fedvlm_data_naming_the_setting() -> None:
    from fedvlm.config import load_config
    from fedvlm.errors import ConfigError

    base = [
        "task=lightning",
        "model.module_class=lightning.LightningModule",
        "data.datamodule_class=lightning.LightningDataModule",
        "evaluation.select_metric=acc",
    ]
    with pytest.raises(ConfigError, match="does not support explain.enabled=true"):
        load_config(None, [*base, "explain.enabled=true"])
    with pytest.raises(ConfigError, match="needs evaluation.select_metric"):
        load_config(None, base[:-1])
    with pytest.raises(ConfigError, match="needs model.module_class and data.datamodule_class"):
        load_config(None, ["task=lightning", "evaluation.select_metric=acc"])


def test_a_datamodule_class_that_is_not_one_is_named(tmp_path: Path) -> None:
    from fedvlm.config import load_config
    from fedvlm.errors import ConfigError
    from fedvlm.tasks import get_task

    cfg = load_config(
        None,
        [
            "task=lightning",
            "model.module_class=torch.nn.Linear",
            "data.datamodule_class=torch.nn.Linear",
            "evaluation.select_metric=acc",
        ],
    )
    with pytest.raises(ConfigError, match=r"model.module_class='torch.nn.Linear' is not a subclass of LightningModule"):
        get_task("lightning").prepare(cfg, tmp_path)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def docs_example(name: str) -> str:
    """The fenced block after ``<!-- byo-lightning-example: NAME -->`` in docs/architecture.md."""
    text = DOCS.read_text()
    start = text.index(f"<!-- byo-lightning-example: {name} -->")
    opening = text.index("```", start)
    body = text.index("\n", opening) + 1
    return text[body : text.index("```", body)]


def test_the_documented_example_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedvlm.cli import main

    (tmp_path / "mypkg.py").write_text(docs_example("mypkg.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    generator = torch.Generator().manual_seed(1)
    recipe = docs_example("byo.yaml")
    for hospital in ("a", "b"):
        x = torch.randn(120, 4, generator=generator)
        folder = tmp_path / "data" / hospital
        folder.mkdir(parents=True)
        torch.save({"x": x, "y": (x[:, 0] + 0.5 * x[:, 1] > 0).long()}, folder / "train.pt")
        recipe = recipe.replace(f"/data/{hospital}/train.pt", str(folder / "train.pt"))
    (tmp_path / "byo.yaml").write_text(recipe)
    try:
        assert main(["fit", "--recipe", str(tmp_path / "byo.yaml"), "--out", str(tmp_path / "run")]) == 0
    finally:
        sys.modules.pop("mypkg", None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"test/site/hospital_a/acc", "test/site/hospital_b/acc"} <= set(rows[-1])
    assert rows[-1]["val/acc"] > 0.85  # a linearly separable problem, learnt across the two hospitals
