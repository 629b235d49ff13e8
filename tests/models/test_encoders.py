from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fedvlm.errors import ConfigError
from fedvlm.models.encoders import (
    build_image_encoder,
    build_text_encoder,
    image_encoders,
    text_encoders,
)

OFFLINE_IMAGE = ["vit_micro", "vit_tiny"]  # random init; larger ones are the same code path
OFFLINE_TEXT = ["bert_micro"]


@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_image_encoders_map_a_batch_to_out_dim(name: str) -> None:
    encoder = build_image_encoder({"name": name}, img_size=32)
    out = encoder(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, encoder.out_dim)


@pytest.mark.parametrize("name", OFFLINE_TEXT)
def test_text_encoders_mean_pool_over_the_mask(name: str) -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder({"name": name}, vocab_size=50).eval()
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = encoder(ids, mask)
    assert out.shape == (2, encoder.out_dim)
    hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0], hidden[0, :3].mean(0))


def test_registries_list_the_paper_encoders() -> None:
    assert {"vit_micro", "vit_base", "timm"} <= set(image_encoders.names())
    assert {"bert_micro", "clinicalbert", "hf"} <= set(text_encoders.names())


def test_image_encoder_loads_pretrained_weights_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_image_encoder({"name": "vit_micro"}, img_size=32).eval()
    weights = tmp_path / "vit" / "model.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(weights))
    images = torch.randn(2, 3, 32, 32)
    for pretrained in (str(weights), str(weights.parent)):  # a file, or a folder holding it
        loaded = build_image_encoder({"name": "vit_micro", "pretrained": pretrained}, img_size=32).eval()
        torch.testing.assert_close(loaded(images), source(images))


def test_text_encoder_loads_a_local_folder(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = build_text_encoder({"name": "bert_micro"}, vocab_size=40).eval()
    source.model.save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder({"name": "hf", "pretrained": str(tmp_path / "bert")}, vocab_size=None).eval()
    ids, mask = torch.randint(0, 40, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    torch.testing.assert_close(loaded(ids, mask), source(ids, mask))


def test_missing_local_weights_and_missing_options_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained weights not found at ./nowhere"):
        build_image_encoder({"name": "vit_micro", "pretrained": "./nowhere"}, img_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no weights file"):
        build_image_encoder({"name": "vit_micro", "pretrained": str(tmp_path / "empty")}, img_size=32)
    with pytest.raises(ConfigError, match="options.arch must name a timm model"):
        build_image_encoder({"name": "timm"}, img_size=32)
    with pytest.raises(ConfigError, match="needs the tokenizer's vocab_size"):
        build_text_encoder({"name": "bert_micro"}, vocab_size=None)
    assert "resnet18" in timm.list_models("resnet18")


def test_unreachable_hub_ids_fail_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="model.text_encoder.pretrained='no-such-org/no-such-model' is neither"):
        build_text_encoder({"name": "hf", "pretrained": "no-such-org/no-such-model"}, vocab_size=None)
    from fedvlm.models.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match="tokenizer 'no-such-org/no-such-model' is neither a local folder"):
        load_tokenizer("no-such-org/no-such-model")
