"""Deltas quantised to int16 steps of ``step``: half the bytes of float32 weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord

from fedvlm.federation.codecs import update_codecs


@dataclass
class Int16Options:
    step: float = 1e-4

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError(f"step={self.step} must be positive")


@update_codecs.register("int16_delta", options=Int16Options)
class Int16DeltaCodec:
    def __init__(self, step: float = 1e-4) -> None:
        self.step = step

    def encode(self, local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> ArrayRecord:
        packed = {}
        for key, value in local.items():
            value = value.detach().cpu()
            if value.is_floating_point():
                steps = torch.round((value - reference[key].cpu()) / self.step)
                value = steps.clamp(-32768, 32767).to(torch.int16)
            packed[key] = value
        return ArrayRecord(torch_state_dict=packed)

    def decode(self, record: ArrayRecord, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        restored = {}
        for key, value in record.to_torch_state_dict().items():
            ref = reference[key]
            restored[key] = ref + value.to(ref.dtype) * self.step if ref.is_floating_point() else value
        return restored
