"""Update codecs: how a client's weights are packed for the uplink and unpacked by the server.

Every codec has ``encode(local, reference) -> ArrayRecord`` and
``decode(record, reference) -> state``, where ``reference`` is the global state the client
started the round from (both sides know it). Codecs compose with any aggregation strategy
because the server decodes before aggregating. A codec that draws random numbers declares
``stochastic = True`` and takes the client's seeded ``generator`` as a third argument, so a run
repeats bit for bit.

``federation.codec``: ``none`` (the weights), ``fp16`` (float16 deltas), and ``int8``, ``int4``,
``int2`` (stochastic uniform quantisation of the delta, one scale per ``block`` entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedvlm.registry import Registry

State = dict[str, torch.Tensor]


class UpdateCodec(Protocol):
    """Packs a local state for transport and restores it on the server."""

    def encode(self, local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> ArrayRecord: ...

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State: ...


class IdentityCodec:
    """Send the weights as they are (Flower's convention; what robust strategies expect)."""

    def encode(self, local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in local.items()})

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        return dict(record.to_torch_state_dict())


class Float16DeltaCodec:
    """Send ``local − reference`` in float16: half the bytes of float32 weights.

    Deltas are small, so float16's relative precision (≈5e-4) costs far less than rounding the
    weights themselves; non-float entries travel unchanged.

    Example:
        >>> codec = Float16DeltaCodec()
        >>> ref = {"w": torch.tensor([1.0, 2.0])}
        >>> record = codec.encode({"w": torch.tensor([1.5, 1.0])}, ref)
        >>> codec.decode(record, ref)["w"]
        tensor([1.5000, 1.0000])
    """

    def encode(self, local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
        packed = {}
        for key, value in local.items():
            value = value.detach().cpu()
            packed[key] = (value - reference[key].cpu()).half() if value.is_floating_point() else value
        return ArrayRecord(torch_state_dict=packed)

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        restored = {}
        for key, value in record.to_torch_state_dict().items():
            base = reference[key]
            restored[key] = base + value.to(base.dtype) if base.is_floating_point() else value
        return restored


@dataclass
class QuantizeOptions:
    """``block``: entries that share one scale (the largest ``|Δ|`` among them); smaller blocks
    track the delta's range more closely and cost ``4 / block`` bytes an entry more."""

    block: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.block <= 1 << 20:
            raise ValueError(f"block={self.block} must be in 1..{1 << 20}")


class StochasticQuantizer:
    """Send ``Δ = local − reference`` quantised to ``bits`` bits, unbiased (QSGD-style).

    Per block of ``block`` entries, with ``s`` the block's largest ``|Δ|`` and ``L = 2^(bits−1) − 1``
    levels each side of 0, an entry becomes ``q = ⌊Δ·L/s + u⌋`` with ``u ~ U[0, 1)``, so
    ``E[q·s/L] = Δ`` exactly and ``|q·s/L − Δ| < s/L``. One tensor travels as one ``uint8`` array:
    the block scales (float32) followed by the codes, packed ``8 / bits`` to a byte. Non-float
    entries travel unchanged. Bytes per entry: ``bits/8 + 4/block`` (int8 ≈ 3.9×, int4 ≈ 7.8×,
    int2 ≈ 15× fewer than float32 with the default block of 256).

    Example:
        >>> codec = StochasticQuantizer(bits=4, block=2)
        >>> ref = {"w": torch.zeros(4)}
        >>> record = codec.encode({"w": torch.tensor([0.7, -0.7, 0.1, 0.0])}, ref, torch.Generator().manual_seed(0))
        >>> record["w"].numpy().nbytes  # 2 float32 scales + 4 codes of 4 bits
        10
        >>> codec.decode(record, ref)["w"]  # each block's largest |Δ| is its scale: exact
        tensor([ 0.7000, -0.7000,  0.1000,  0.0000])
    """

    stochastic: ClassVar[bool] = True

    def __init__(self, bits: int, block: int = 256) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"bits={bits} must be 2, 4 or 8")
        self.bits, self.block = bits, block
        self.levels = (1 << (bits - 1)) - 1

    def encode(
        self,
        local: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> ArrayRecord:
        packed = {}
        for key, value in local.items():
            value = value.detach().cpu()
            if not value.is_floating_point():
                packed[key] = value
                continue
            delta = (value.float() - reference[key].cpu().float()).flatten()
            blocks = torch.nn.functional.pad(delta, (0, -len(delta) % self.block)).view(-1, self.block)
            scale = blocks.abs().amax(dim=1)
            unit = blocks * (self.levels / torch.where(scale > 0, scale, 1.0))[:, None]
            noise = torch.rand(unit.shape, generator=generator)
            codes = (torch.floor(unit + noise).clamp(-self.levels, self.levels) + self.levels).to(torch.uint8)
            packed[key] = torch.from_numpy(
                np.concatenate([scale.numpy().view(np.uint8), _pack(codes.flatten()[: len(delta)].numpy(), self.bits)])
            )
        return ArrayRecord(torch_state_dict=packed)

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        restored = {}
        for key, value in record.to_torch_state_dict().items():
            base = reference[key]
            if not base.is_floating_point():
                restored[key] = value
                continue
            size = base.numel()
            num_blocks = math.ceil(size / self.block)
            raw = value.numpy()
            scale = torch.from_numpy(raw[: 4 * num_blocks].copy().view(np.float32))
            codes = torch.from_numpy(_unpack(raw[4 * num_blocks :], self.bits, size).astype(np.float32))
            steps = (codes - self.levels) / self.levels
            delta = steps * scale.repeat_interleave(self.block)[:size]
            restored[key] = base + delta.view(base.shape).to(base.dtype)
        return restored


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``uint8`` codes below ``2^bits`` packed ``8 / bits`` to a byte, first code in the low bits."""
    per_byte = 8 // bits
    padded = np.pad(codes, (0, -len(codes) % per_byte)).reshape(-1, per_byte).astype(np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    """The first ``size`` codes of :func:`_pack`'s bytes."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(-1)[:size]


update_codecs: Registry[UpdateCodec] = Registry("update codec")
update_codecs.register("none")(IdentityCodec)
update_codecs.register("fp16")(Float16DeltaCodec)


@update_codecs.register("int8", options=QuantizeOptions)
def int8_codec(block: int = 256) -> StochasticQuantizer:
    return StochasticQuantizer(8, block)


@update_codecs.register("int4", options=QuantizeOptions)
def int4_codec(block: int = 256) -> StochasticQuantizer:
    return StochasticQuantizer(4, block)


@update_codecs.register("int2", options=QuantizeOptions)
def int2_codec(block: int = 256) -> StochasticQuantizer:
    return StochasticQuantizer(2, block)


def encode_update(
    codec: UpdateCodec, local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], seed: int
) -> ArrayRecord:
    """``codec.encode``, with a generator seeded by ``seed`` for a stochastic codec."""
    if getattr(codec, "stochastic", False):
        return codec.encode(local, reference, torch.Generator().manual_seed(seed))  # type: ignore[call-arg]
    return codec.encode(local, reference)
