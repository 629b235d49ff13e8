"""Update codecs: how a client's weights are packed for the uplink and unpacked by the server.

Every codec has ``encode(local, reference) -> ArrayRecord`` and
``decode(record, reference) -> state``, where ``reference`` is the global state the client
started the round from (both sides know it). Codecs compose with any aggregation strategy
because the server decodes before aggregating.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

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


update_codecs: Registry[UpdateCodec] = Registry("update codec")
update_codecs.register("none")(IdentityCodec)
update_codecs.register("fp16")(Float16DeltaCodec)
