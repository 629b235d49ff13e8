"""Shared fixtures: tiny configs and generated data, so a real Trainer and Flower run in tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

collect_ignore = ["plugins"]
"""The example plugin is a package to install, not tests: importing it here (``--doctest-modules``)
would register its components in every later test."""

TINY_OVERRIDES = [
    "data.synthetic.n=240",
    "data.image_size=32",
    "data.max_text_length=48",
    "federation.num_clients=3",
    "federation.rounds=2",
    "data.partition.name=iid",
    "trainer.batch_size=16",
]
"""A run of the demo recipe small enough for tests (seconds per round)."""

CXR_TINY = [
    "data.synthetic.n=240",
    "data.synthetic.num_sites=3",
    "federation.num_clients=3",
    "federation.rounds=2",
    "data.image_size=32",
    "data.max_text_length=48",
    "trainer.batch_size=32",
    "trainer.local_epochs=1",
]
"""A run of the ``cxr_demo`` recipe small enough for tests (one client per synthetic hospital)."""


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)
