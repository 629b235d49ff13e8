"""ShapCallback: a real Trainer round, the files of a round, shareable aggregates, state left alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from fedvlm.data.prepared import make_loader
from fedvlm.errors import DataError
from fedvlm.tasks.leukemia.shap import ShapCallback, file_stem, load_round, previous_round, summarize

GENERATED_TO_TINY = 24 / 32


def make_callback(tmp_path: Path, patients, rows: int = 2, **options) -> ShapCallback:  # type: ignore[no-untyped-def]
    bundle = {k: v[:rows] for k, v in patients.bundle.items()}
    records = patients.records[:rows]
    return ShapCallback(
        output_dir=tmp_path / "explain",
        patients=bundle,
        image_baseline="blur",
        text_baseline="mask",
        max_evals=600,  # 2^9 coalitions fit: exact
        top_k=3,
        share_summary=options.pop("share_summary", True),
        tokenizer=patients.vocabulary,
        blast_points=[[(x * GENERATED_TO_TINY, y * GENERATED_TO_TINY) for x, y in r.blast_points] for r in records],
        signal_words=[r.signal_words for r in records],
        **options,
    )


def fit(module: L.LightningModule, callback: ShapCallback, patients) -> None:  # type: ignore[no-untyped-def]
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, make_loader(patients.bundle, batch_size=3, shuffle=True))


def test_a_training_round_writes_the_round_and_aggregates(tmp_path: Path, patients, tiny_module) -> None:
    module = tiny_module()
    callback = make_callback(tmp_path, patients)
    callback.round = 1
    fit(module, callback, patients)
    directory = tmp_path / "explain" / "round_001"
    for stem in ("00000", "00001"):
        saved = json.loads((directory / f"{stem}.json").read_text())
        assert saved["round"] == 1 and saved["patient"] == stem
        assert len(saved["image"]["attributions"]["detection"]) == 9 and saved["image"]["grid"] == [3, 3]
        assert len(saved["text"]["features"]) == 8 and saved["text"]["method"] == "exact"
        for name in ("image", "detection", "stage"):
            with Image.open(directory / f"{stem}_{name}.png") as image:
                assert image.size == (24, 24)
        assert "Stage head" in (directory / f"{stem}.html").read_text()
    assert "00001.html" in (directory / "index.html").read_text()
    summary = callback.shareable_metrics()
    assert json.loads((directory / "summary.json").read_text()) == pytest.approx(summary, nan_ok=True)
    assert summary["explain/patients"] == 2 and summary["explain/efficiency_error_max"] < 1e-6
    assert summary["explain/model_evals"] == 2 * (2**9 + 2) + 2 * (2**8 + 2)
    assert 0 < summary["explain/sparsity"] <= 1 and summary["explain/seconds"] > 0
    assert 0 <= summary["explain/image_blast_hit_rate"] <= 1 and summary["explain/image_blast_chance"] > 0
    assert "explain/consistency" not in summary  # no earlier round
    assert all(isinstance(value, float) for value in summary.values())

    callback.round = 2
    fit(module, callback, patients)
    assert previous_round(tmp_path / "explain", 2) == 1
    assert 0 <= callback.summary["explain/consistency"] <= 1


def test_consistency_with_unchanged_weights_is_one_and_round_provider_is_used(
    tmp_path: Path, patients, tiny_module
) -> None:
    module = tiny_module()
    rounds = iter([4, 7])
    callback = make_callback(tmp_path, patients, round_provider=lambda: next(rounds))
    callback.explain(module)
    summary = callback.explain(module)
    assert summary["explain/consistency"] == 1.0
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == ["round_004", "round_007"]
    reloaded = load_round(tmp_path / "explain", 4, ["00000"])["00000"]
    np.testing.assert_allclose(
        reloaded.image.attributions["stage"], callback.explanations[0].image.attributions["stage"]
    )


@pytest.mark.parametrize("training", [True, False])
def test_the_module_is_left_in_the_mode_it_was_found_in(tmp_path: Path, patients, tiny_module, training: bool) -> None:
    module = tiny_module().train(training)
    callback = make_callback(tmp_path, patients, rows=1)
    with torch.set_grad_enabled(training):
        callback.explain(module)
        assert torch.is_grad_enabled() is training
    assert module.training is training
    assert all(p.requires_grad for p in module.parameters())


def test_nothing_is_shared_unless_asked(tmp_path: Path, patients, tiny_module) -> None:
    callback = make_callback(tmp_path, patients, rows=1, share_summary=False)
    callback.explain(tiny_module())
    assert callback.summary["explain/patients"] == 1 and callback.shareable_metrics() == {}


def test_mismatched_ground_truth_is_refused(tmp_path: Path, patients) -> None:
    with pytest.raises(DataError, match="1 patient_ids for 2 patients"):
        make_callback(tmp_path, patients, patient_ids=["only-one"])


def test_summary_of_no_patients_is_zero_and_ids_become_file_names() -> None:
    assert summarize([], top_k=3)["explain/patients"] == 0.0
    assert file_stem("../etc/passwd") == ".._etc_passwd"
