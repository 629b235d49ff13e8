"""Third-party components through entry points: the example plugin in ``tests/plugins`` registers a
strategy with options, a parameterised codec, a partitioner, an image encoder and a task (one file
each), and one federated run uses all five. docs/architecture.md shows these files verbatim."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvlm.errors import ConfigError

PLUGINS = Path(__file__).parent / "plugins"
PACKAGE = PLUGINS / "fedvlm_example_plugin"
ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
PLUGIN_OVERRIDES = [
    "federation.strategy={name: server_step, server_lr: 0.5}",
    "federation.codec={name: int16_delta, step: 1e-5}",
    "data.partition={name: round_robin, offset: 1}",
    "model.image_encoder={name: pooled_cnn, options: {width: 6}}",
    "task=leukemia_detection",
]


@pytest.fixture
def plugin_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The plugin on the path of this process and of every process it starts (Ray's workers);
    uninstalled afterwards, so later tests see the built-in registries only."""
    from fedvlm import registry

    registries = [registry.registry_of(group) for group in registry.PLUGIN_GROUPS]
    before = [(dict(r._factories), dict(r._options)) for r in registries]
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", f"{PLUGINS}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"))
    registry.load_plugins()
    yield
    for r, (factories, options) in zip(registries, before, strict=True):
        r._factories, r._options = factories, options
    registry._LOADED.clear()
    for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE.name]:
        del sys.modules[name]


@pytest.mark.usefixtures("plugin_installed")
def test_plugin_components_register_with_their_options() -> None:
    from fedvlm.config import load_config
    from fedvlm.data.partition import partition
    from fedvlm.federation.codecs import update_codecs
    from fedvlm.federation.strategies import strategies
    from fedvlm.models.encoders import build_image_encoder
    from fedvlm.tasks import get_task
    from fedvlm.tasks.base import selection_key

    cfg = load_config("leukemia_demo", PLUGIN_OVERRIDES)
    assert dict(cfg.federation.strategy) == {"name": "server_step", "server_lr": 0.5}
    assert dict(cfg.federation.codec) == {"name": "int16_delta", "step": 1e-5}
    assert dict(cfg.model.image_encoder.options) == {"width": 6}
    # strategy: w ← w + η·(avg − w) = 0 + 0.5·(1 − 0)
    step = strategies.build(cfg.federation.strategy)
    assert step.linear and step.server_update({"w": torch.zeros(1)}, {"w": torch.ones(1)})["w"].item() == 0.5
    # codec: deltas in int16 steps of 1e-5, restored to within half a step
    codec = update_codecs.build(cfg.federation.codec)
    reference = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)}
    record = codec.encode({"w": torch.tensor([1.00123, -2.5]), "n": torch.tensor(4)}, reference)
    assert record["w"].dtype == "int16" and record["w"].numpy().tolist() == [123, -32768]  # −50000 steps clamp
    restored = codec.decode(record, reference)
    assert restored["w"][0].item() == pytest.approx(1.00123, abs=5e-6) and int(restored["n"]) == 4
    # partitioner: patients a, b, c, d (first seen in that order) dealt from client 1
    shards = partition("round_robin", [0] * 6, 3, seed=0, groups=["b", "b", "a", "c", "d", "a"], offset=1)
    # order of first appearance: b → 1, a → 2, c → 0, d → 1
    assert [s.tolist() for s in shards] == [[3], [0, 1, 4], [2, 5]]
    # encoder: [B, 3, H, W] → [B, width]
    encoder = build_image_encoder(cfg.model.image_encoder, 32)
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 6) and encoder.out_dim == 6
    # task: the leukemia task, its checkpoints chosen by the merged validation AUROC
    task = get_task(cfg.task)
    assert task.name == "leukemia_detection" and selection_key(task, cfg) == "val/auroc"


@pytest.mark.usefixtures("plugin_installed")
def test_plugin_options_are_checked_when_the_config_is_loaded() -> None:
    from fedvlm.config import load_config

    with pytest.raises(ConfigError, match=r"federation.strategy.server_lr=2.0 must be in \(0, 1\]"):
        load_config(None, ["federation.strategy={name: server_step, server_lr: 2}"])
    unknown = r"federation.codec.bits: not an option of update codec 'int16_delta' \(options: step\)"
    with pytest.raises(ConfigError, match=unknown):
        load_config(None, ["federation.codec={name: int16_delta, bits: 8}"])
    with pytest.raises(ConfigError, match="model.image_encoder.options.depth: not an option of image encoder 'pool"):
        load_config(None, ["model.image_encoder={name: pooled_cnn, options: {depth: 2}}"])


def test_a_plugin_that_registers_nothing_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedvlm import registry

    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedvlm.strategies]\nghost = broken_plugin_module\n")
    (tmp_path / "broken_plugin_module.py").write_text("# registers nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    silent = r"plugin 'ghost' \(fedvlm.strategies = 'broken_plugin_module'\) did not register"
    with pytest.raises(ConfigError, match=silent):
        registry.load_plugins()
    sys.modules.pop("broken_plugin_module", None)


def test_architecture_docs_show_the_plugin_files_verbatim() -> None:
    text = ARCHITECTURE.read_text()
    shown = dict(re.findall(r"<!-- plugin-example: (\S+) -->\n```(?:python|ini)\n(.*?)```", text, flags=re.DOTALL))
    expected = {
        f"fedvlm_example_plugin/{name}.py": (PACKAGE / f"{name}.py").read_text()
        for name in ("strategy", "codec", "partitioner", "encoder", "task")
    }
    expected["entry_points.txt"] = (PLUGINS / "fedvlm_example_plugin-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert shown == expected


@pytest.mark.slow
@pytest.mark.usefixtures("plugin_installed")
def test_a_federated_run_uses_all_five_plugin_components(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from fedvlm.cli import main
    from fedvlm.config import load_config
    from fedvlm.data.partition import partition
    from fedvlm.runs import read_metrics
    from fedvlm.tasks import get_task

    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides, "federation.rounds=2", *PLUGIN_OVERRIDES]
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(run_dir), *overrides]) == 0
    rows = read_metrics(run_dir)
    row = rows[-1]
    assert row["server_step/lr"] == 0.5  # the plugin strategy aggregated the round
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)["fedvlm"]
    assert best["best_value"] == max(r["val/auroc"] for r in rows)  # the plugin task chose it by val/auroc
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["image_encoder.conv.0.weight"].shape == (6, 3, 3, 3)  # the plugin encoder was trained
    float_values = sum(v.numel() for v in state.values() if v.is_floating_point())
    # int16 deltas: 2 bytes a value (+ framing), where float32 weights would take 4
    assert row["bytes_received"] < 0.6 * 4 * float_values * row["num_clients"]
    cfg = load_config(run_dir / "config.yaml")
    index = get_task("leukemia").read_site(cfg).index
    shards = partition("round_robin", index.classes, 3, int(cfg.seed), groups=index.patients, offset=1)
    reported = [c["num_samples"] for c in json.loads((run_dir / "partition.json").read_text())["clients"]]
    assert reported == [len(s) for s in shards] and np.isfinite(row["train/loss"])
