"""LoRA adapters: exact start, merged-weight equivalence, frozen backbones, what travels."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation.callback import set_frozen, static_fingerprint, travelling_keys
from fedvlm.models.adapters import LoRALinear, apply_lora, count_parameters
from fedvlm.tasks.cxr.module import ContrastiveVLM
from fedvlm.tasks.leukemia.module import LeukemiaModule

ENCODERS = ("image_encoder", "text_encoder")  # model.freeze_modules


def test_lora_equals_its_merged_linear_layer() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4), rank=2, alpha=8.0)
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    x = torch.randn(3, 6)
    expected = x @ layer.merged_weight().T + layer.base.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.scaling == 4.0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_down.weight", "lora_up.weight"]


def test_apply_lora_wraps_named_linears_and_freezes_the_rest() -> None:
    model = nn.Sequential()
    model.add_module("attn", nn.Module())
    model.attn.qkv = nn.Linear(4, 12)  # type: ignore[assignment]
    model.attn.proj = nn.Linear(4, 4)  # type: ignore[assignment]
    model.add_module("head", nn.Linear(4, 2))
    wrapped = apply_lora(model, ["qkv"], rank=2, alpha=2.0)
    assert wrapped == ["attn.qkv"]
    assert isinstance(model.attn.qkv, LoRALinear) and isinstance(model.attn.proj, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"attn.qkv.lora_down.weight", "attn.qkv.lora_up.weight"}


def test_apply_lora_with_unknown_targets_lists_the_linear_layers() -> None:
    model = nn.ModuleDict({"head": nn.Linear(2, 2), "conv": nn.Conv2d(1, 1, 1)})
    with pytest.raises(ConfigError, match=r"model.adapter.image_targets=\['nope'\] matches no linear layer.*: head$"):
        apply_lora(model, ["nope"], 2, 2.0, where="model.adapter.image_targets")
    assert apply_lora(model, [], 2, 2.0) == [] and not any(p.requires_grad for p in model.parameters())


def _cxr_module(adapter: str) -> ContrastiveVLM:
    cfg = load_config(None, ["task=cxr", f"model.adapter.name={adapter}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    torch.manual_seed(0)
    return ContrastiveVLM(c["model"], c["contrastive"], c["optim"], ("a", "b"), 32, 60)


def test_adapter_mode_sends_only_adapters_heads_and_temperature() -> None:
    full, adapted = _cxr_module("none"), _cxr_module("lora")
    keys = travelling_keys(adapted)
    assert keys and all(
        ".lora_" in k or k.startswith(("image_projection", "text_projection", "logit_scale")) for k in keys
    )
    full_bytes = sum(v.numel() * v.element_size() for k, v in full.state_dict().items() if k in travelling_keys(full))
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in adapted.state_dict().items() if k in keys)
    assert adapter_bytes * 5 < full_bytes
    trainable, total = count_parameters(adapted)
    assert trainable == sum(adapted.state_dict()[k].numel() for k in keys)
    assert total > 5 * trainable
    # freezing the encoders for a round never unfreezes backbones in adapter mode
    set_frozen(adapted, ENCODERS, frozen=True)
    assert not any(p.requires_grad for n, p in adapted.named_parameters() if ".lora_" in n)
    set_frozen(adapted, ENCODERS, frozen=False)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == keys


def test_training_in_adapter_mode_leaves_backbones_bit_identical() -> None:
    module = _cxr_module("lora")
    keys = travelling_keys(module)
    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if k not in keys}
    fingerprint = static_fingerprint(module, keys)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "input_ids": torch.randint(5, 60, (4, 10)),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
        "labels": torch.zeros(4, 2),
    }
    for _ in range(3):
        optimizer.zero_grad()
        module.compute_loss(batch)["loss"].backward()
        optimizer.step()
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())
    assert static_fingerprint(module, keys) == fingerprint
    assert any(not torch.equal(after[k], _cxr_module("lora").state_dict()[k]) for k in keys if ".lora_up" in k)


def test_leukemia_module_supports_adapters_too() -> None:
    cfg = load_config(None, ["model.adapter.name=lora"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    module = LeukemiaModule(c["model"], c["optim"], 32, 60)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(".lora_" in n for n in trainable)
    assert not any(n.startswith(("image_encoder", "text_encoder")) and ".lora_" not in n for n in trainable)
