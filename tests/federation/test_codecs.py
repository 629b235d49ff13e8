import math

import numpy as np
import pytest
import torch

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation.codecs import (
    Float16DeltaCodec,
    IdentityCodec,
    StochasticQuantizer,
    _from_varints,
    _pack,
    _unpack,
    _varints,
    encode_update,
    update_codecs,
)

QUANTIZERS = {"int8": 8, "int4": 4, "int2": 2}


@pytest.mark.parametrize("name", ["none", "fp16"])
def test_every_deterministic_codec_round_trips_within_its_precision(name: str) -> None:
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


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_round_trips_codes_of_any_length(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for size in (1, 3, 7, 8, 1001):
        codes = rng.integers(0, 1 << bits, size).astype(np.uint8)
        packed = _pack(codes, bits)
        assert len(packed) == math.ceil(size * bits / 8)
        np.testing.assert_array_equal(_unpack(packed, bits, size), codes)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizers_stay_within_one_step_of_the_delta(name: str) -> None:
    bits, block = QUANTIZERS[name], 16
    levels = 2 ** (bits - 1) - 1
    torch.manual_seed(0)
    reference = {"w": torch.randn(10, 10), "n": torch.tensor(7)}
    local = {"w": reference["w"] + 0.01 * torch.randn(10, 10), "n": torch.tensor(9)}
    codec = update_codecs.build({"name": name, "block": block})
    decoded = codec.decode(codec.encode(local, reference, torch.Generator().manual_seed(1)), reference)
    assert int(decoded["n"]) == 9 and decoded["w"].shape == (10, 10)
    delta = (local["w"] - reference["w"]).flatten()
    error = (decoded["w"] - local["w"]).flatten().abs()
    for start in range(0, 100, block):  # a step is the block's largest |Δ| over L levels
        step = delta[start : start + block].abs().max() / levels
        assert (error[start : start + block] <= step * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizers_are_unbiased(name: str) -> None:
    """The mean of many seeded decodings converges to the delta: error ≪ one step."""
    bits = QUANTIZERS[name]
    torch.manual_seed(2)
    reference = {"w": torch.randn(64)}
    local = {"w": reference["w"] + 0.1 * torch.randn(64)}
    codec = update_codecs.build({"name": name, "block": 64})
    draws = 1500
    delta = (local["w"] - reference["w"]).double()
    total = torch.zeros(64, dtype=torch.float64)
    for seed in range(draws):  # in float64: a float32 sum of 4000 weights drifts more than the bound
        total += codec.decode(encode_update(codec, local, reference, seed)[0], reference)["w"].double() - reference["w"]
    step = delta.abs().max() / (2 ** (bits - 1) - 1)
    # each entry's rounding is a Bernoulli on one step: std of the mean ≤ step / (2·√draws)
    assert (total / draws - delta).abs().max() < 5 * step / (2 * math.sqrt(draws))
    one = codec.decode(encode_update(codec, local, reference, 0)[0], reference)["w"]
    assert bits == 8 or not torch.allclose(one, local["w"], atol=step.item() / 10)  # a single draw is coarse


@pytest.mark.parametrize(("name", "block"), [("int8", 256), ("int4", 64), ("int2", 32)])
def test_quantizers_send_bits_per_entry_plus_one_scale_per_block(name: str, block: int) -> None:
    bits = QUANTIZERS[name]
    size = 1 << 16
    reference = {"w": torch.zeros(size)}
    local = {"w": torch.randn(size)}
    record = update_codecs.build({"name": name, "block": block}).encode(local, reference, torch.Generator())
    assert record["w"].numpy().nbytes == size * bits // 8 + 4 * (size // block)
    ratio = IdentityCodec().encode(local, reference).count_bytes() / record.count_bytes()
    assert ratio > 0.95 * 32 / (bits + 32 / block)


def test_a_quantizer_is_seeded_by_the_client_and_exact_on_zero_deltas() -> None:
    codec = StochasticQuantizer(bits=4, block=8)
    reference = {"w": torch.randn(40)}
    local = {"w": reference["w"] + torch.randn(40)}
    same = [encode_update(codec, local, reference, 5)[0]["w"].numpy() for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], encode_update(codec, local, reference, 6)[0]["w"].numpy())
    unchanged = codec.decode(codec.encode(reference, reference, torch.Generator()), reference)["w"]
    assert torch.equal(unchanged, reference["w"])


def test_quantizer_options_are_checked_when_the_config_is_loaded() -> None:
    cfg = load_config(None, ["federation.codec=int4"])
    assert dict(cfg.federation.codec) == {"name": "int4", "block": 256}
    with pytest.raises(ConfigError, match=r"federation.codec.block=0 must be in 1\.\.1048576"):
        load_config(None, ["federation.codec={name: int8, block: 0}"])
    with pytest.raises(ConfigError, match="federation.codec.bits: not an option of update codec 'int2'"):
        load_config(None, ["federation.codec={name: int2, bits: 3}"])


def test_varints_round_trip_gaps_of_every_width() -> None:
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**35 + 7, 5])
    np.testing.assert_array_equal(_from_varints(_varints(values), len(values)), values)
    assert len(_varints(np.arange(128))) == 128  # gaps under 128 cost one byte
    with pytest.raises(ValueError, match="truncated"):
        _from_varints(_varints(values)[:-1], len(values))


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_topk_sends_the_largest_entries_of_each_tensor(bits: int) -> None:
    torch.manual_seed(3)
    reference = {"a": torch.randn(50, 20), "b": torch.randn(7), "frozen": torch.randn(9), "n": torch.tensor(1)}
    local = {"a": reference["a"] + torch.randn(50, 20), "b": reference["b"] + torch.randn(7), "n": torch.tensor(4)}
    codec = update_codecs.build({"name": "topk", "fraction": 0.05, "bits": bits})
    record = codec.encode(local, reference, torch.Generator().manual_seed(0))
    decoded = codec.decode(record, reference)
    assert set(decoded) == {"a", "b", "n"} and int(decoded["n"]) == 4  # "frozen" did not travel
    for key, kept in (("a", 50), ("b", 1)):  # round(0.05·1000) = 50; at least one of 7
        delta = (local[key] - reference[key]).flatten()
        sent = (decoded[key] - reference[key]).flatten()
        top = delta.abs().topk(kept).indices
        assert set(torch.nonzero(sent).flatten().tolist()) <= set(top.tolist())
        step = {32: 1e-6, 16: 2e-3 * delta.abs().max(), 8: delta[top].abs().max() / 127}[bits]
        assert (sent[top] - delta[top]).abs().max() <= step * 1.0001 + 1e-6
        others = torch.ones(len(delta), dtype=torch.bool)
        others[top] = False
        assert not sent[others].any()


@pytest.mark.parametrize("bits", [32, 8])
def test_topk_sends_tensors_below_dense_below_whole_and_without_positions(bits: int) -> None:
    torch.manual_seed(5)
    reference = {"big": torch.randn(1000), "bias": torch.randn(64), "gain": torch.randn(64)}
    local = {k: v + torch.randn_like(v) for k, v in reference.items()}
    sparse = update_codecs.build({"name": "topk", "fraction": 0.05, "bits": bits})
    dense = update_codecs.build({"name": "topk", "fraction": 0.05, "bits": bits, "dense_below": 65})
    generator = torch.Generator().manual_seed(0)
    decoded = dense.decode(dense.encode(local, reference, generator), reference)
    for key in ("bias", "gain"):  # every entry arrives, within one quantisation step
        delta = local[key] - reference[key]
        step = 1e-6 if bits == 32 else float(delta.abs().max()) / 127
        assert (decoded[key] - local[key]).abs().max() <= step * 1.0001 + 1e-6
    assert int(torch.count_nonzero(decoded["big"] - reference["big"])) == 50  # still top-5%
    # 2·64 more values than the sparse codec's 2·3, and no position bytes for them
    extra_values = (2 * 64 - 2 * 3) * bits // 8
    sparse_bytes = sparse.encode(local, reference, torch.Generator().manual_seed(0)).count_bytes()
    dense_bytes = dense.encode(local, reference, torch.Generator().manual_seed(0)).count_bytes()
    assert dense_bytes - sparse_bytes == extra_values - 2 * 3  # the 6 sparse positions were 1 byte each


def test_topk_at_one_percent_with_8_bit_values_is_over_100x_smaller_than_float32() -> None:
    reference = {f"layer{i}.weight": torch.zeros(300, 300) for i in range(4)}
    local = {k: torch.randn(300, 300) for k in reference}
    codec = update_codecs.build({"name": "topk", "fraction": 0.01, "bits": 8, "error_feedback": True})
    record, _ = encode_update(codec, local, reference, 0, {})
    ratio = IdentityCodec().encode(local, reference).count_bytes() / record.count_bytes()
    assert ratio > 100  # 1 byte a value + ~1.5 bytes a position, for 1% of the entries


def test_error_feedback_sends_the_true_deltas_minus_the_final_residual() -> None:
    """Σ_t transmitted_t = Σ_t Δ_t − r_T, exactly (up to float32 rounding), and a tensor that
    does not travel in a round keeps its residual."""
    torch.manual_seed(4)
    codec = update_codecs.build({"name": "topk", "fraction": 0.1, "bits": 8, "error_feedback": True})
    global_state = {"w": torch.randn(200), "v": torch.randn(30)}
    residual: dict[str, torch.Tensor] = {}
    true_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    sent_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
    for t in range(6):
        keys_now = ["w"] if t == 2 else ["w", "v"]  # round 3: "v" is frozen and stays home
        local = {k: global_state[k] + 0.1 * torch.randn_like(global_state[k]) for k in keys_now}
        kept = {k: v.clone() for k, v in residual.items()}
        record, residual = encode_update(codec, local, global_state, t, residual)
        decoded = codec.decode(record, global_state)
        if t == 2:
            assert "v" not in decoded and torch.equal(residual["v"], kept["v"])
        for k in keys_now:
            true_sum[k] += (local[k] - global_state[k]).double()
            sent_sum[k] += (decoded[k] - global_state[k]).double()
        global_state = {
            k: global_state[k] + (decoded[k] - global_state[k] if k in decoded else 0) for k in global_state
        }
    for k in true_sum:
        torch.testing.assert_close(sent_sum[k], true_sum[k] - residual[k].double(), rtol=0, atol=1e-5)
    assert residual["w"].abs().max() > 0  # something really was held back


def test_topk_options_are_checked_when_the_config_is_loaded() -> None:
    cfg = load_config(None, ["federation.codec={name: topk, fraction: 0.01, bits: 8, error_feedback: true}"])
    assert dict(cfg.federation.codec) == {
        "name": "topk",
        "fraction": 0.01,
        "bits": 8,
        "error_feedback": True,
        "dense_below": 0,
    }
    with pytest.raises(ConfigError, match="federation.codec.dense_below=-1 must be >= 0"):
        load_config(None, ["federation.codec={name: topk, dense_below: -1}"])
    with pytest.raises(ConfigError, match=r"federation.codec.fraction=0.0 must be in \(0, 1\]"):
        load_config(None, ["federation.codec={name: topk, fraction: 0}"])
    with pytest.raises(ConfigError, match="federation.codec.bits=12 must be one of 32, 16, 8, 4, 2"):
        load_config(None, ["federation.codec={name: topk, bits: 12}"])


@pytest.mark.parametrize("spec", [{"name": "int2", "block": 4}, {"name": "topk", "fraction": 0.1, "bits": 8}])
def test_lossy_codecs_send_running_statistics_exactly(spec: dict[str, object]) -> None:
    """A small variance beside large deltas would be rounded below zero; listed as exact, it travels as it is."""
    reference = {"w": torch.zeros(40), "bn.running_var": torch.full((8,), 1e-3)}
    local = {"w": torch.randn(40), "bn.running_var": torch.tensor([1e-4, 5.0, 2e-4, 3e-4, 1e-4, 4.0, 1e-4, 1e-4])}
    codec = update_codecs.build(spec)
    record, _ = encode_update(codec, local, reference, 0, None, ["bn.running_var"])
    decoded = codec.decode(record, reference)
    assert torch.equal(decoded["bn.running_var"], local["bn.running_var"])
    assert not torch.equal(decoded["w"], local["w"])  # the parameters are still compressed
