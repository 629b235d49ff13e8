"""The CXR task: data without site metadata (MIMIC-CXR) still trains with the demo recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import DictConfig

import fedvlm.tasks.cxr.task as cxr_task
from fedvlm.config import load_config
from fedvlm.data.sites import client_source
from fedvlm.errors import ConfigError, DataError
from fedvlm.tasks import get_task
from fedvlm.tasks.cxr.records import CxrDataset
from fedvlm.tasks.cxr.synthetic import SynthCxrConfig, generate_cxr
from fedvlm.tasks.site import client_rows, partition_spec


@pytest.fixture
def siteless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic records with the site removed, as a MIMIC-CXR source gives them."""
    dataset = generate_cxr(SynthCxrConfig(n=120, image_size=32, num_sites=3, seed=0))
    records = [dataclasses.replace(r, site=None) for r in dataset.records]

    def load(cfg: DictConfig) -> CxrDataset:
        return CxrDataset(records, dataset.label_names)

    monkeypatch.setattr(cxr_task, "load_dataset", load)
    monkeypatch.setattr(cxr_task, "is_synthetic", lambda data: False)  # read through load_dataset
    monkeypatch.setattr(cxr_task, "label_names", lambda cfg: tuple(dataset.label_names))


@pytest.mark.usefixtures("siteless")
def test_site_partition_falls_back_when_the_data_have_no_sites(tmp_path: Path) -> None:
    overrides = ["data.image_size=32", "federation.num_clients=3", "data.max_text_length=48"]
    cfg = load_config("cxr_demo", overrides)
    assert cfg.data.partition.name == "site" and cfg.data.partition.fallback.name == "dirichlet"
    records = get_task("cxr").read_site(cfg)
    assert partition_spec(cfg, records.index) == {"name": "dirichlet", "alpha": 0.5, "min_size": 0}
    rows = [client_rows(cfg, client_source(cfg, k), records.index) for k in range(3)]
    held = sorted(int(i) for r in rows for split in ("train", "val", "test") for i in r[split])
    assert held == list(range(120))  # every record at exactly one client

    strict = load_config("cxr_demo", [*overrides, "data.partition.fallback=null"])
    with pytest.raises((ConfigError, ValueError, DataError), match="site"):
        client_rows(strict, client_source(strict, 0), get_task("cxr").read_site(strict).index)


def test_prompts_are_pairs_or_ensembles_and_tokenize_with_absent_phrasings_masked() -> None:
    from transformers import BertTokenizerFast

    names = ("Cardiomegaly", "Edema", "Atelectasis")
    cfg = load_config(
        "cxr_demo",
        [
            "evaluation.prompts={Cardiomegaly: [big heart, normal heart], "
            "Edema: {positive: [wet lungs, edema], negative: clear lungs}}"
        ],
    )
    prompts = cxr_task.prompt_sets(cfg, names)
    assert prompts["Cardiomegaly"] == (("big heart",), ("normal heart",))
    assert prompts["Edema"] == (("wet lungs", "edema"), ("clear lungs",))
    assert prompts["Atelectasis"] == (("There is atelectasis.",), ("No atelectasis.",))  # not in the generator
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "big", "heart", "normal", "wet", "lungs", "edema", "clear"]
    tokenizer = BertTokenizerFast(vocab_file=None, vocab=dict(zip(vocab, range(len(vocab)), strict=True)))
    tokens = cxr_task.tokenize_prompts(tokenizer, prompts, names, max_length=8)
    assert tokens["input_ids"].shape == (3, 2, 2, 8)
    present = tokens["attention_mask"].any(dim=-1)
    assert present.tolist() == [[[True, False], [True, False]], [[True, True], [True, False]], [[True, False]] * 2]
    assert tokens["input_ids"][1, 0, 0, :4].tolist() == [2, 7, 8, 3]  # [CLS] wet lungs [SEP]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("[only one]", "must be \\[positive prompt, negative prompt\\]"),
        ("{positive: [a]}", "exactly the keys positive and negative"),
        ("{positive: [], negative: [b]}", "at least one non-empty prompt"),
    ],
)
def test_malformed_prompts_name_the_key(entry: str, message: str) -> None:
    cfg = load_config("cxr_demo", [f"evaluation.prompts={{Edema: {entry}}}"])
    with pytest.raises(ConfigError, match=f"evaluation.prompts.Edema.*{message}|evaluation.prompts.Edema: {message}"):
        cxr_task.prompt_sets(cfg, ("Edema",))
    with pytest.raises(ConfigError, match="unknown label 'Edma'"):
        cxr_task.prompt_sets(load_config("cxr_demo", ["evaluation.prompts={Edma: [a, b]}"]), ("Edema",))
