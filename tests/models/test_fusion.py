import pytest
import torch

from fedvlm.models.fusion import ConcatFusion, GatedFusion, fusions


def test_concat_fusion_is_eq18_layernorm_before_relu() -> None:
    fusion = ConcatFusion([2, 1], 3)
    with torch.no_grad():
        fusion.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
        fusion.linear.bias.zero_()
    z_img, z_txt = torch.tensor([[1.0, 2.0]]), torch.tensor([[6.0]])
    # W [z; h] + b = [1, 2, 6]; LayerNorm: mean 3, var 14/3 → (x - 3) / sqrt(14/3 + eps); ReLU keeps 6's entry.
    std = (14.0 / 3.0 + fusion.norm.eps) ** 0.5
    expected = torch.tensor([[0.0, 0.0, 3.0 / std]])
    torch.testing.assert_close(fusion([z_img, z_txt]), expected)


def test_concat_fusion_is_xavier_initialised() -> None:
    torch.manual_seed(0)
    fusion = ConcatFusion([300, 200], 500)
    bound = (6.0 / (500 + 500)) ** 0.5  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    weights = fusion.linear.weight
    assert weights.abs().max() <= bound and weights.abs().max() > 0.95 * bound
    assert torch.count_nonzero(fusion.linear.bias) == 0


def test_gated_fusion_is_eqs_19_20() -> None:
    fusion = GatedFusion([2, 2], 2)
    with torch.no_grad():
        for layer in (fusion.image_proj, fusion.text_proj):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        fusion.gate.weight.zero_()
        fusion.gate.bias.copy_(torch.tensor([0.0, 2.0]))
    z, h = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    alpha = torch.sigmoid(torch.tensor([0.0, 2.0]))  # σ(W_g[z; h] + b_g) with W_g = 0
    expected = alpha * z + (1 - alpha) * h  # r = α ⊙ z + (1 − α) ⊙ h
    torch.testing.assert_close(fusion([z, h]), expected)
    torch.testing.assert_close(fusion.last_gate, alpha.unsqueeze(0))


def test_gated_fusion_gate_follows_the_inputs() -> None:
    torch.manual_seed(0)
    fusion = GatedFusion([4, 4], 3)
    out_a = fusion([torch.randn(2, 4), torch.randn(2, 4)])
    gate_a = fusion.last_gate.clone()
    fusion([torch.randn(2, 4), torch.randn(2, 4)])
    assert out_a.shape == (2, 3) and not torch.equal(gate_a, fusion.last_gate)
    assert ((gate_a > 0) & (gate_a < 1)).all()


@pytest.mark.parametrize("name", ["concat", "gated"])
def test_every_fusion_maps_two_modalities_to_out_dim(name: str) -> None:
    fusion = fusions.create(name, [5, 7], 4)
    assert fusion([torch.randn(3, 5), torch.randn(3, 7)]).shape == (3, 4)


def test_gated_fusion_needs_two_modalities() -> None:
    with pytest.raises(ValueError, match="exactly two modalities"):
        GatedFusion([4], 3)
