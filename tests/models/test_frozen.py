"""Frozen towers: eval mode, the per-site embedding cache, and what DP-SGD and the wire make of
frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedvlm.errors import ConfigError
from fedvlm.federation.callback import travelling_keys
from fedvlm.models.adapters import apply_lora
from fedvlm.models.encoders import build_image_encoder, build_text_encoder
from fedvlm.models.frozen import EmbeddingCache, attach_embedding_cache, held_batchnorms, tower_digest
from fedvlm.privacy import check_private_trainable


class TwoTower(nn.Module):
    """A frozen CNN tower (BatchNorm) under a trainable head."""

    def __init__(self, freeze: bool) -> None:
        super().__init__()
        self.image_encoder = build_image_encoder({"name": "resnet_micro"}, 32)
        if freeze:
            apply_lora(self.image_encoder, [], rank=1, alpha=1.0)
        self.head = nn.Linear(self.image_encoder.out_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_encoder(images))


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def test_a_frozen_tower_stays_in_eval_mode_and_its_statistics_do_not_move() -> None:
    torch.manual_seed(0)
    model = TwoTower(freeze=True)  # as built: in training mode, and Lightning 2.6 never calls train()
    before = _bn_buffers(model)
    model(torch.randn(8, 3, 32, 32) * 3 + 1).sum().backward()
    assert not model.image_encoder.training and model.head.training
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(model).items())
    # a trainable tower's BatchNorm does learn statistics (the assertion above could fail)
    trainable = TwoTower(freeze=False).train()
    before = _bn_buffers(trainable)
    trainable(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert any(not torch.equal(before[k], v) for k, v in _bn_buffers(trainable).items())


def test_held_batchnorm_statistics_do_not_travel_and_dp_accepts_them() -> None:
    frozen, trainable = TwoTower(freeze=True), TwoTower(freeze=False)
    assert held_batchnorms(frozen) and not held_batchnorms(trainable)
    assert travelling_keys(frozen) == {"head.weight", "head.bias"}
    assert any("running_mean" in key for key in travelling_keys(trainable))
    check_private_trainable(frozen)  # no error
    with pytest.raises(ConfigError, match=r"image_encoder\.backbone\.bn1 \(BatchNorm2d\).*or freeze them"):
        check_private_trainable(trainable)


def test_cached_embeddings_equal_the_towers_own_and_are_computed_once() -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder({"name": "bert_micro"}, vocab_size=50)
    encoder.requires_grad_(False).train()  # frozen: train() leaves it in eval mode
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    reference = encoder(ids, mask)  # no cache attached: the plain forward
    cache = EmbeddingCache()
    attach_embedding_cache(encoder, cache)
    assert torch.allclose(encoder(ids, mask), reference, atol=1e-6)
    assert (cache.hits, cache.misses) == (0, 3)
    # the same reports in another batch, padded to another length: all hits, same embeddings
    shorter_ids, shorter_mask = ids[[2, 1], :4], mask[[2, 1], :4]
    assert torch.allclose(encoder(shorter_ids, shorter_mask), reference[[2, 1]], atol=1e-6)
    assert (cache.hits, cache.misses) == (2, 3)
    # a trainable tower never uses the cache
    encoder.requires_grad_(True).train()
    encoder(ids, mask)
    assert (cache.hits, cache.misses) == (2, 3)


def test_inputs_that_need_gradients_bypass_the_cache() -> None:
    encoder = build_image_encoder({"name": "resnet_micro"}, 32).requires_grad_(False).eval()
    cache = EmbeddingCache()
    attach_embedding_cache(encoder, cache)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    encoder(images).sum().backward()  # Grad-CAM / saliency: the tower must really run
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert len(cache) == 0


def test_the_cache_survives_a_fresh_process_through_the_sites_folder(tmp_path) -> None:
    rows = torch.arange(12, dtype=torch.float32).view(4, 3)
    keys = [row.numpy().tobytes() for row in rows]
    first = EmbeddingCache(tmp_path)
    first.embed(b"tower-a", keys, lambda index: rows[index] * 10)
    first.save()
    calls: list[int] = []

    def compute(index: torch.Tensor) -> torch.Tensor:
        calls.append(len(index))
        return rows[index] * 10

    again = EmbeddingCache(tmp_path)  # what the next round's client process builds
    assert torch.equal(again.embed(b"tower-a", keys[::-1], compute), rows.flip(0) * 10)
    assert calls == []
    again.embed(b"tower-b", keys[:2], compute)  # other weights: nothing to reuse
    assert calls == [2]


def test_the_tower_digest_follows_the_weights() -> None:
    layer = nn.Linear(3, 2)
    digest = tower_digest(layer)
    assert tower_digest(layer) == digest
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    assert tower_digest(layer) != digest
