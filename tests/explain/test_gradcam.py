"""Grad-CAM: planted CNN and ViT models whose target reads one region, clean hooks, real towers."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.explain.gradcam import grad_cam, target_layer
from fedvlm.tasks.cxr.gradcam import cxr_grad_cam, label_logits
from fedvlm.tasks.cxr.module import ContrastiveVLM

IMAGE = 16
LABELS = ("Cardiomegaly", "Pleural Effusion")


class QuadrantGate(nn.Module):
    """Channel ``c`` of the output sees only quadrant ``c`` (row-major) of its input's mean channel."""

    def __init__(self, size: int) -> None:
        super().__init__()
        gates = torch.zeros(4, size, size)
        half = size // 2
        for quadrant in range(4):
            r, c = divmod(quadrant, 2)
            gates[quadrant, r * half : (r + 1) * half, c * half : (c + 1) * half] = 1.0
        self.gates: torch.Tensor
        self.register_buffer("gates", gates)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=1, keepdim=True) * self.gates


class PlantedCnn(nn.Module):
    """conv → BatchNorm → 2x2 pooling → quadrant gate (the Grad-CAM layer) → the target reads one channel,
    so the target depends only on the pixels of quadrant ``quadrant``."""

    def __init__(self, quadrant: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, kernel_size=1)
        nn.init.constant_(self.stem.weight, 1.0)
        assert self.stem.bias is not None
        nn.init.zeros_(self.stem.bias)
        self.norm = nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(2)
        self.gate = QuadrantGate(IMAGE // 2)
        self.quadrant = quadrant

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gated = self.gate(self.pool(torch.relu(self.norm(self.stem(images)))))
        return gated[:, self.quadrant].sum(dim=(1, 2))


class PlantedVit(nn.Module):
    """4x4 patches → a class token plus one token per patch whose only non-zero feature is its own
    index (positional one-hot × mean intensity) → an identity "block" (the Grad-CAM layer) → mean of
    the patch tokens; the target reads feature ``patch``, so it depends only on that patch."""

    def __init__(self, patch: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = (IMAGE // patch_size, IMAGE // patch_size)
        self.block = nn.Identity()
        self.patch = patch

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        size = self.patch_size
        intensity = nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), size).flatten(1)  # [B, N]
        tokens = torch.diag_embed(intensity)  # token n = intensity_n · e_n
        cls = torch.ones_like(tokens[:, :1])
        hidden = self.block(torch.cat([cls, tokens], dim=1))
        return hidden[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(images)[:, self.patch]


def bright_images(batch: int = 2) -> torch.Tensor:
    return 0.5 + 0.5 * torch.rand(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def no_hooks(module: nn.Module) -> bool:
    return all(not (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks) for sub in module.modules())


@pytest.mark.parametrize("quadrant", [0, 1, 3])
def test_cnn_grad_cam_peaks_in_the_only_region_the_target_reads(quadrant: int) -> None:
    model = PlantedCnn(quadrant)
    maps = grad_cam(model, model.gate, bright_images(), model)
    assert maps.shape == (2, IMAGE, IMAGE)
    r, c = divmod(quadrant, 2)
    half = IMAGE // 2
    inside = torch.zeros(IMAGE, IMAGE, dtype=torch.bool)
    inside[r * half : (r + 1) * half, c * half : (c + 1) * half] = True
    for heatmap in maps:
        assert inside.flatten()[heatmap.argmax()]
        assert heatmap.max() == 1.0
        assert heatmap[inside].mean() > 5 * heatmap[~inside].mean()


@pytest.mark.parametrize("patch", [0, 6, 15])
def test_vit_grad_cam_on_tokens_peaks_at_the_patch_the_target_reads(patch: int) -> None:
    model = PlantedVit(patch)
    maps = grad_cam(model, model.block, bright_images(), model, token_grid=model.grid)
    coarse = nn.functional.avg_pool2d(maps.unsqueeze(1), model.patch_size).flatten(1)  # back to the grid
    assert (coarse.argmax(dim=1) == patch).all()


def test_several_targets_give_one_map_each_from_one_forward() -> None:
    model = PlantedVit(0)
    maps = grad_cam(model, model.block, bright_images(), lambda x: model.pooled(x)[:, [0, 5]], token_grid=model.grid)
    assert maps.shape == (2, 2, IMAGE, IMAGE)
    coarse = nn.functional.avg_pool2d(maps, model.patch_size).flatten(2)
    assert (coarse.argmax(dim=2) == torch.tensor([0, 5])).all()


def test_a_layer_that_runs_twice_is_refused_and_its_hook_removed() -> None:
    model = PlantedVit(0)
    with pytest.raises(RuntimeError, match="ran 2 times"):
        grad_cam(model, model.block, bright_images(), lambda x: model(x) + model(x), token_grid=model.grid)
    assert no_hooks(model)


def test_state_is_restored_and_no_hook_lingers() -> None:
    model = PlantedCnn(1)
    model.train()
    model.pool.eval()  # a mixed state must come back as it was
    bias = model.stem.bias
    assert bias is not None
    bias.requires_grad_(False)
    grad_cam(model, model.gate, bright_images(), model)
    assert model.training and model.norm.training and not model.pool.training
    assert model.stem.weight.requires_grad and not bias.requires_grad
    assert model.stem.weight.grad is None
    assert no_hooks(model)


def test_frozen_models_are_explained_too() -> None:
    model = PlantedCnn(2)
    for param in model.parameters():
        param.requires_grad_(False)
    with torch.no_grad():  # callers often are
        maps = grad_cam(model, model.gate, bright_images(), model)
    for heatmap in maps:  # quadrant 2: bottom left
        row, col = divmod(int(heatmap.argmax()), IMAGE)
        assert row >= IMAGE // 2 and col < IMAGE // 2
    assert not any(param.requires_grad for param in model.parameters())


def build(*overrides: str) -> ContrastiveVLM:
    cfg = load_config(None, ["task=cxr", "model.dropout=0.0", *overrides])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    torch.manual_seed(0)
    module = ContrastiveVLM(container["model"], container["contrastive"], container["optim"], LABELS, 32, 50)
    if module.modality == "fused":
        ids = torch.randint(5, 50, (len(LABELS), 2, 6), generator=torch.Generator().manual_seed(2))
        module.set_prompts(ids, torch.ones_like(ids))
    return module


@pytest.mark.parametrize(("encoder", "layer"), [("vit_micro", "blocks.1.norm1"), ("resnet_micro", "layer4")])
def test_the_default_layer_is_the_last_block_or_stage(encoder: str, layer: str) -> None:
    module = build(f"model.image_encoder.name={encoder}")
    assert module.image_encoder is not None
    assert target_layer(module.image_encoder)[0] == layer
    # at 32 px a ResNet's layer4 is 1x1: the default is the last stage with a 4x4 map
    assert target_layer(module.image_encoder, image_size=32)[0] == ("layer2" if encoder == "resnet_micro" else layer)
    assert target_layer(module.image_encoder, "patch_embed" if encoder == "vit_micro" else "layer3")[1] is not None
    with pytest.raises(ConfigError, match="not a submodule"):
        target_layer(module.image_encoder, "nope")


def test_the_fused_target_is_the_logit_of_the_zero_shot_probability() -> None:
    module = build().eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = module.zero_shot_probabilities(module.embed_images(images))
        assert torch.allclose(torch.sigmoid(label_logits(module, images)), expected, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [("model.image_encoder.name=vit_micro",), ("model.image_encoder.name=resnet_micro",), ("model.modality=image",)],
)
def test_real_towers_give_maps_in_unit_range_and_come_back_untouched(overrides: tuple[str, ...]) -> None:
    module = build(*overrides)
    module.train()
    before = {name: param.detach().clone() for name, param in module.state_dict().items()}
    maps = cxr_grad_cam(module, torch.randn(2, 3, 32, 32), ["Pleural Effusion", 0])
    assert maps.shape == (2, 2, 32, 32)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert module.training and no_hooks(module)
    assert all(param.grad is None for param in module.parameters())
    assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())


def test_unknown_labels_and_text_only_models_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown label 'Edema'"):
        cxr_grad_cam(build(), torch.randn(1, 3, 32, 32), ["Edema"])
    with pytest.raises(ConfigError, match="text-only"):
        cxr_grad_cam(build("model.modality=text"), torch.randn(1, 3, 32, 32), [0])
