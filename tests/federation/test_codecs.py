import pytest
import torch

from fedvlm.federation.codecs import Float16DeltaCodec, IdentityCodec, update_codecs


@pytest.mark.parametrize("name", update_codecs.names())
def test_every_codec_round_trips_within_its_precision(name: str) -> None:
    torch.manual_seed(0)
    reference = {"w": torch.randn(64, 32), "n": torch.tensor(3)}
    local = {"w": reference["w"] + 0.01 * torch.randn(64, 32), "n": torch.tensor(5)}
    codec = update_codecs.create(name)
    decoded = codec.decode(codec.encode(local, reference), reference)
    assert set(decoded) == set(local)
    torch.testing.assert_close(decoded["w"], local["w"], atol=5e-5, rtol=0)  # fp16 of a 0.01-sized delta
    assert int(decoded["n"]) == 5


def test_fp16_delta_codec_halves_the_bytes_and_beats_fp16_weights() -> None:
    torch.manual_seed(1)
    reference = {"w": torch.randn(256, 256) * 3}
    local = {"w": reference["w"] + 1e-3 * torch.randn(256, 256)}
    full = IdentityCodec().encode(local, reference)
    half = Float16DeltaCodec().encode(local, reference)
    assert half.count_bytes() < 0.51 * full.count_bytes()
    delta_error = (Float16DeltaCodec().decode(half, reference)["w"] - local["w"]).abs().max()
    weight_error = (local["w"].half().float() - local["w"]).abs().max()
    assert delta_error < weight_error / 100
