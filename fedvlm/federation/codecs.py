"""Update codecs: how a client's weights are packed for the uplink and unpacked by the server.

Every codec has ``encode(local, reference) -> ArrayRecord`` and
``decode(record, reference) -> state``, where ``reference`` is the global state the client
started the round from (both sides know it). Codecs compose with any aggregation strategy
because the server decodes before aggregating. A codec that draws random numbers declares
``stochastic = True`` and takes the client's seeded ``generator`` as a third argument, so a run
repeats bit for bit.

``federation.codec``: ``none`` (the weights), ``fp16`` (float16 deltas), ``int8``, ``int4``,
``int2`` (stochastic uniform quantisation of the delta, one scale per ``block`` entries) and
``topk`` (the largest ``fraction`` of each tensor's delta entries, values optionally quantised,
with optional error feedback: a codec with memory declares ``error_feedback = True``, and the
client keeps its residual in its node state between rounds).

``reference`` is exactly the state the server sent (its downlink keys, in the same order on both
sides), so a codec may pack a whole update into one array and name its tensors by position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
        self.exact: frozenset[str] = frozenset()  # float entries sent as they are (running statistics)

    def codes(self, unit: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Values in units of one step (``[−L, L]``) rounded up or down at random, unbiased, as
        ``uint8`` codes ``0..2L``."""
        noise = torch.rand(unit.shape, generator=generator)
        return (torch.floor(unit + noise).clamp(-self.levels, self.levels) + self.levels).to(torch.uint8)

    def steps(self, codes: torch.Tensor) -> torch.Tensor:
        """:meth:`codes` back to values in ``[−1, 1]`` (multiply by the scale)."""
        return (codes.float() - self.levels) / self.levels

    def encode(
        self,
        local: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> ArrayRecord:
        packed = {}
        for key, value in local.items():
            value = value.detach().cpu()
            if not value.is_floating_point() or key in self.exact:
                packed[key] = value
                continue
            delta = (value.float() - reference[key].cpu().float()).flatten()
            blocks = torch.nn.functional.pad(delta, (0, -len(delta) % self.block)).view(-1, self.block)
            scale = blocks.abs().amax(dim=1)
            unit = blocks * (self.levels / torch.where(scale > 0, scale, 1.0))[:, None]
            codes = self.codes(unit, generator)
            packed[key] = torch.from_numpy(
                np.concatenate([scale.numpy().view(np.uint8), _pack(codes.flatten()[: len(delta)].numpy(), self.bits)])
            )
        return ArrayRecord(torch_state_dict=packed)

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        restored = {}
        for key, value in record.to_torch_state_dict().items():
            base = reference[key]
            if not base.is_floating_point() or value.is_floating_point():  # sent as it is
                restored[key] = value
                continue
            size = base.numel()
            num_blocks = math.ceil(size / self.block)
            raw = value.numpy()
            scale = torch.from_numpy(raw[: 4 * num_blocks].copy().view(np.float32))
            codes = torch.from_numpy(_unpack(raw[4 * num_blocks :], self.bits, size).astype(np.float32))
            delta = self.steps(codes) * scale.repeat_interleave(self.block)[:size]
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


@dataclass
class TopKOptions:
    """``fraction``: the share of each tensor's entries sent (at least one); ``bits``: 32 sends the
    values as float32, 16 as float16, 8/4/2 quantises them (unbiased, one scale per tensor);
    ``error_feedback``: add what was not sent to the next round's delta; ``dense_below``: tensors
    with fewer entries than this are sent whole (biases, norms, small heads, which top-k would
    starve to one entry a round), their values quantised as the others."""

    fraction: float = 0.01
    bits: int = 32
    error_feedback: bool = False
    dense_below: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1]")
        if self.dense_below < 0:
            raise ValueError(f"dense_below={self.dense_below} must be >= 0")
        if self.bits not in (32, 16, 8, 4, 2):
            raise ValueError(f"bits={self.bits} must be one of 32, 16, 8, 4, 2")


TOPK_BLOB = "topk"
"""The one array of a top-k update (every float tensor's entries, by position in the reference)."""


class TopKCodec:
    """Send the ``fraction`` largest ``|Δ|`` entries of each float tensor (Deep Gradient
    Compression's sparsification), as one ``uint8`` array.

    Layout: a bitmask of which reference tensors the update holds (sorted keys; frozen tensors do
    not travel), per tensor one float32 scale when ``bits < 16``, every kept value (float32,
    float16 or packed codes), then the kept positions as LEB128 varints of their gaps (one byte for
    a gap under 128). A tensor of ``n`` entries keeps ``max(1, round(fraction·n))``, or all of them
    when ``n < dense_below`` (then no positions travel); both sides know it. Non-float entries
    travel unchanged beside the array.

    With ``error_feedback`` (Seide et al. 2014; Stich et al. 2018), the client adds its residual,
    what earlier rounds did not send (unsent entries and value-quantisation error), to the delta
    before selecting, and keeps the new residual: over ``T`` rounds the transmitted updates sum to
    the true deltas minus the final residual.

    Example:
        >>> codec = TopKCodec(fraction=0.5)
        >>> ref = {"w": torch.zeros(4)}
        >>> record, residual = codec.encode_with_feedback({"w": torch.tensor([0.1, -3.0, 0.2, 2.0])}, ref, None, {})
        >>> codec.decode(record, ref)["w"], residual
        (tensor([ 0., -3.,  0.,  2.]), {})
    """

    error_feedback: ClassVar[bool] = False

    def __init__(
        self, fraction: float = 0.01, bits: int = 32, error_feedback: bool = False, dense_below: int = 0
    ) -> None:
        self.fraction, self.bits, self.dense_below = fraction, bits, dense_below
        self.error_feedback = error_feedback  # type: ignore[misc]
        self.quantizer = StochasticQuantizer(bits) if bits <= 8 else None
        self.exact: frozenset[str] = frozenset()  # float entries sent as they are (running statistics)

    @property
    def stochastic(self) -> bool:
        return self.quantizer is not None

    def kept(self, size: int) -> int:
        """How many of a tensor's ``size`` entries are sent."""
        if size < self.dense_below:
            return size
        return min(size, max(1, round(self.fraction * size)))

    def encode(
        self,
        local: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> ArrayRecord:
        return self.encode_with_feedback(local, reference, generator, {})[0]

    def encode_with_feedback(
        self,
        local: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor],
        generator: torch.Generator | None,
        residual: Mapping[str, torch.Tensor],
    ) -> tuple[ArrayRecord, State]:
        """The record and, with error feedback, the new residual (``residual`` for tensors not
        sent this round is kept as it was)."""
        order = sorted(reference)
        floats = [k for k in order if k in local and reference[k].is_floating_point() and k not in self.exact]
        compressed = set(floats)
        mask = np.array([k in compressed for k in order], dtype=bool)
        scales, values, gaps = [], [], []
        new_residual = {k: v for k, v in residual.items() if k not in compressed} if self.error_feedback else {}
        for key in floats:
            delta = (local[key].detach().cpu().float() - reference[key].cpu().float()).flatten()
            if self.error_feedback and key in residual:
                delta = delta + residual[key].flatten().float()
            count = self.kept(len(delta))
            if count == len(delta):  # sent whole: no positions travel
                positions = torch.arange(len(delta))
            else:
                positions = torch.topk(delta.abs(), count, sorted=False).indices.sort().values
                gaps.append(torch.diff(positions, prepend=torch.tensor([-1])) - 1)
            chosen = delta[positions]
            if self.quantizer is not None:
                scale = chosen.abs().max()
                codes = self.quantizer.codes(chosen * (self.quantizer.levels / scale if scale > 0 else 0.0), generator)
                scales.append(scale.reshape(1))
                values.append(codes)
                sent = self.quantizer.steps(codes) * scale
            else:
                values.append(chosen.to(torch.float16 if self.bits == 16 else torch.float32))
                sent = values[-1].float()
            if self.error_feedback:
                left = delta.clone()
                left[positions] -= sent
                new_residual[key] = left.view(reference[key].shape)
        parts = [np.packbits(mask)]
        if scales:
            parts.append(torch.cat(scales).numpy().view(np.uint8))
        if values:
            if self.quantizer is not None:
                parts.append(_pack(torch.cat(values).numpy(), self.quantizer.bits))
            else:
                parts.append(torch.cat(values).numpy().view(np.uint8))
        if gaps:
            parts.append(_varints(torch.cat(gaps).numpy()))
        packed: dict[str, torch.Tensor] = {TOPK_BLOB: torch.from_numpy(np.concatenate(parts))}
        packed.update({k: v.detach().cpu() for k, v in local.items() if k not in compressed})
        return ArrayRecord(torch_state_dict=packed), new_residual

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> State:
        state = record.to_torch_state_dict()
        blob = state.pop(TOPK_BLOB).numpy()
        order = sorted(reference)
        mask_bytes = math.ceil(len(order) / 8)
        mask = np.unpackbits(blob[:mask_bytes])[: len(order)].astype(bool)
        keys = [k for k, sent in zip(order, mask, strict=True) if sent]
        counts = [self.kept(reference[k].numel()) for k in keys]
        total = sum(counts)
        offset = mask_bytes
        if self.quantizer is not None:
            scales = blob[offset : offset + 4 * len(keys)].copy().view(np.float32)
            offset += 4 * len(keys)
            value_bytes = math.ceil(total * self.quantizer.bits / 8)
            codes = torch.from_numpy(_unpack(blob[offset : offset + value_bytes], self.quantizer.bits, total))
            values = (self.quantizer.steps(codes) * torch.from_numpy(np.repeat(scales, counts))).numpy()
        else:
            width = 2 if self.bits == 16 else 4
            value_bytes = total * width
            raw = blob[offset : offset + value_bytes].copy().view(np.float16 if width == 2 else np.float32)
            values = raw.astype(np.float32)
        offset += value_bytes
        sparse = sum(count for key, count in zip(keys, counts, strict=True) if count < reference[key].numel())
        gaps = _from_varints(blob[offset:], sparse)
        restored: State = {}
        start = gap_start = 0
        for key, count in zip(keys, counts, strict=True):
            base = reference[key]
            delta = torch.zeros(base.numel(), dtype=torch.float32)
            if count == base.numel():  # sent whole
                delta[:] = torch.from_numpy(values[start : start + count])
            else:
                positions = torch.from_numpy(np.cumsum(gaps[gap_start : gap_start + count] + 1) - 1)
                delta[positions] = torch.from_numpy(values[start : start + count])
                gap_start += count
            restored[key] = base + delta.view(base.shape).to(base.dtype)
            start += count
        restored.update(state)  # non-float entries, as they were
        return restored


def _varints(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as LEB128 varints (7 bits a byte, high bit: more follows).

    Example:
        >>> _varints(np.array([0, 127, 128, 300])).tolist()
        [0, 127, 128, 1, 172, 2]
    """
    values = values.astype(np.uint64)
    width = np.ones(len(values), dtype=np.int64)
    for shift in range(7, 64, 7):
        width += (values >> np.uint64(shift)) > 0
    out = np.zeros(int(width.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(width)[:-1]])
    for byte in range(int(width.max(initial=0))):
        live = width > byte
        chunk = ((values[live] >> np.uint64(7 * byte)) & np.uint64(0x7F)).astype(np.uint8)
        more = (width[live] > byte + 1).astype(np.uint8) << 7
        out[starts[live] + byte] = chunk | more
    return out


def _from_varints(data: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` integers of :func:`_varints`' bytes."""
    ends = np.flatnonzero(data < 0x80)[:count]
    if len(ends) < count:
        raise ValueError(f"truncated top-k positions: {len(ends)} of {count}")
    starts = np.concatenate([[0], ends[:-1] + 1])
    values = np.zeros(count, dtype=np.int64)
    for byte in range(int((ends - starts).max(initial=0)) + 1):
        live = starts + byte <= ends
        values[live] |= (data[starts[live] + byte].astype(np.int64) & 0x7F) << (7 * byte)
    return values


update_codecs.register("topk", options=TopKOptions)(TopKCodec)


def encode_update(
    codec: UpdateCodec,
    local: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    seed: int,
    residual: Mapping[str, torch.Tensor] | None = None,
    exact: Sequence[str] = (),
) -> tuple[ArrayRecord, State]:
    """``codec.encode`` with a generator seeded by ``seed`` for a stochastic codec, and, for a codec
    with error feedback, this client's ``residual`` in and its new residual out (else empty).
    A lossy codec sends the float entries ``exact`` (BatchNorm running statistics: a quantised or
    sparse delta of a variance can make it negative) as they are."""
    if hasattr(codec, "exact"):
        codec.exact = frozenset(exact)
    generator = torch.Generator().manual_seed(seed) if getattr(codec, "stochastic", False) else None
    if getattr(codec, "error_feedback", False):
        return codec.encode_with_feedback(local, reference, generator, residual or {})  # type: ignore[attr-defined]
    if generator is not None:
        return codec.encode(local, reference, generator), {}  # type: ignore[call-arg]
    return codec.encode(local, reference), {}
