"""SecAgg+ (fedvlm.federation.secure): the server gets FedAvg of the updates and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from omegaconf import OmegaConf

from fedvlm.cli import main
from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.secure import CLIPPED_FRACTION, SecureAggregator, secure_aggregation_mod
from fedvlm.federation.strategies import FedAvg
from fedvlm.runs import load_checkpoint, read_metrics
from tests.federation.conftest import InProcessGrid

SIZES = {0: 100, 1: 40, 2: 250, 3: 10, 4: 80}
CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**22


def _settings(**changes: object) -> object:
    settings = {
        "enabled": True,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        "max_weight": None,
        "num_shares": 1.0,
        "reconstruction_threshold": 0.5,
    }
    return OmegaConf.create({**settings, **changes})


def _reference() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 32, generator=generator),
        "b": torch.randn(32, generator=generator),
        "steps": torch.tensor(7),  # an integer buffer: never summed
    }


def _deltas() -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        pid: {"w": 0.05 * torch.randn(64, 32, generator=generator), "b": 0.05 * torch.randn(32, generator=generator)}
        for pid in SIZES
    }


def _toy_app(deltas: dict[int, dict[str, torch.Tensor]], failing: frozenset[int] = frozenset()) -> ClientApp:
    """Clients whose 'training' adds a known delta (and bumps the integer buffer)."""
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[keys.PARTITION_ID])
        if pid in failing:
            raise RuntimeError(f"client {pid} lost power")
        start = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
        local = {k: v + deltas[pid][k] if v.is_floating_point() else v + 5 for k, v in start.items()}
        metrics = MetricRecord({keys.NUM_EXAMPLES: SIZES[pid], keys.PARTITION_ID: pid, keys.TRAIN_LOSS: 0.1 * pid})
        return Message(
            RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=local), keys.METRICS: metrics}), reply_to=msg
        )

    return app


def _run(grid: InProcessGrid, reference: dict[str, torch.Tensor], **changes: object):  # type: ignore[no-untyped-def]
    nodes = {pid: 100 + pid for pid in SIZES}
    contents = {
        pid: RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=reference), keys.CONFIG: _config()}) for pid in SIZES
    }
    aggregator = SecureAggregator(_settings(**changes), timeout=30.0)  # type: ignore[arg-type]
    return aggregator.run(cast(Grid, grid), contents, nodes, reference, SIZES, server_round=1)


def _config():  # type: ignore[no-untyped-def]
    from flwr.app import ConfigRecord

    return ConfigRecord({keys.SERVER_ROUND: 1})


def _grid(app: ClientApp) -> InProcessGrid:
    return InProcessGrid(app, {100 + pid: {keys.PARTITION_ID: pid} for pid in SIZES})


def _fedavg(reference: dict[str, torch.Tensor], deltas: dict[int, dict[str, torch.Tensor]], pids: list[int]):  # type: ignore[no-untyped-def]
    updates = [ClientUpdate(pid, SIZES[pid], {k: reference[k] + deltas[pid][k] for k in ("w", "b")}) for pid in pids]
    return FedAvg().aggregate(RoundReplies(updates, {}), reference)


def _quantisation_bound(pids: list[int]) -> float:
    """Stochastic rounding moves each client's scaled value by < one step; the sum is then
    divided by Σ n_k / max_weight."""
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    max_weight = max(SIZES[pid] for pid in SIZES)
    return len(pids) * step / (sum(SIZES[pid] for pid in pids) / max_weight) + 1e-7


def test_the_secure_sum_equals_fedavg_within_the_quantisation_error() -> None:
    reference, deltas = _reference(), _deltas()
    result = _run(_grid(_toy_app(deltas)), reference)

    assert result.completed and not result.failed
    assert set(result.mean_delta) == {"w", "b"}  # the integer buffer is not summed
    expected = _fedavg(reference, deltas, list(SIZES))
    bound = _quantisation_bound(list(SIZES))
    for key in ("w", "b"):
        error = (reference[key].double() + result.mean_delta[key] - expected[key].double()).abs().max().item()
        assert error <= bound, (key, error, bound)
    # Unweighted averaging would be far off: the weighting by n_k really happens.
    unweighted = torch.stack([deltas[pid]["w"] for pid in SIZES]).mean(0)
    assert (result.mean_delta["w"] - unweighted.double()).abs().max() > 100 * bound
    # Scalars travel in the clear, as in plain FedAvg.
    assert {pid: r[keys.NUM_EXAMPLES] for pid, r in result.replies.items()} == SIZES
    assert result.replies[3][keys.TRAIN_LOSS] == pytest.approx(0.3)
    assert all(r[CLIPPED_FRACTION] == 0.0 for r in result.replies.values())


def test_no_client_update_is_visible_to_the_server() -> None:
    reference, deltas = _reference(), _deltas()
    grid = _grid(_toy_app(deltas))
    result = _run(grid, reference)
    assert result.completed

    masked_replies = [
        m for m in grid.received if Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked_replies) == len(SIZES)
    for reply in masked_replies:
        # The arrays the train handler returned were emptied before leaving the client ...
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        pid = int(reply.content.config_records["fitres.metrics"][keys.PARTITION_ID])  # type: ignore[call-overload]
        vectors = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        # [masked weight factor, masked "b", masked "w"]: entries in sorted order after the weight
        masked = bytes_to_ndarray(vectors[2])  # type: ignore[index, arg-type]
        # ... and what was sent instead is uniform noise over [0, 2^32), uncorrelated with the update.
        assert masked.size == deltas[pid]["w"].numel()
        assert abs(masked.mean() / 2**32 - 0.5) < 0.05
        correlation = np.corrcoef(masked.astype(np.float64).ravel(), deltas[pid]["w"].numpy().ravel())[0, 1]
        assert abs(correlation) < 0.15
    # Nothing the server received holds a client's weights or delta in the clear.
    for reply in grid.received:
        for record in reply.content.array_records.values():
            assert len(record) == 0


def test_a_client_that_drops_out_is_named_and_its_masks_are_removed() -> None:
    reference, deltas = _reference(), _deltas()
    result = _run(_grid(_toy_app(deltas, failing=frozenset({3}))), reference)

    assert result.completed
    assert set(result.failed) == {3} and "client 3 lost power" in result.failed[3]
    survivors = [0, 1, 2, 4]
    assert sorted(result.replies) == survivors
    expected = _fedavg(reference, deltas, survivors)
    error = (reference["w"].double() + result.mean_delta["w"] - expected["w"].double()).abs().max().item()
    assert error <= _quantisation_bound(survivors)


def test_too_few_survivors_to_unmask_learns_nothing() -> None:
    reference, deltas = _reference(), _deltas()
    # Threshold 4 of 5 shares: with two clients gone no mask can be rebuilt.
    result = _run(_grid(_toy_app(deltas, failing=frozenset({1, 3}))), reference, reconstruction_threshold=4)
    assert not result.completed and result.mean_delta == {}
    assert {1, 3} <= set(result.failed)


def test_values_beyond_the_clipping_range_are_reported() -> None:
    reference, deltas = _reference(), _deltas()
    deltas[2]["w"][0, :8] = 3.0  # the largest client (ratio 1): 8 of 2,080 coordinates beyond ±1
    result = _run(_grid(_toy_app(deltas)), reference)
    assert result.replies[2][CLIPPED_FRACTION] == pytest.approx(8 / (64 * 32 + 32))
    assert result.replies[0][CLIPPED_FRACTION] == 0.0


def test_train_messages_without_secagg_pass_through_the_mod() -> None:
    deltas = _deltas()
    reference = _reference()
    grid = _grid(_toy_app(deltas))
    message = Message(
        RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=reference), keys.CONFIG: _config()}),
        dst_node_id=100,
        message_type=keys.TRAIN,
    )
    (reply,) = grid.send_and_receive([message])
    local = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    torch.testing.assert_close(local["w"], reference["w"] + deltas[0]["w"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.strategy=krum"], "federation.strategy=krum"),
        (["federation.codec=fp16"], "federation.codec=fp16"),
        (["federation.secure_aggregation.clipping_range=0"], "federation.secure_aggregation.clipping_range"),
        (["federation.secure_aggregation.num_shares=2.5"], "federation.secure_aggregation.num_shares"),
    ],
)
def test_settings_that_cannot_work_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("leukemia_demo", ["federation.secure_aggregation.enabled=true", *overrides])


@pytest.mark.slow
def test_a_secure_federation_matches_plain_fedprox(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """The real ClientApp under Flower's simulation: SecAgg+ with FedProx and FedAvg weighting
    gives the plain run's weights up to quantisation (both runs are deterministic)."""
    overrides = [*tiny_overrides, "federation.rounds=1", "federation.strategy=fedprox", "data.partition.name=dirichlet"]
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    assert main(["fit", "--recipe", "leukemia_demo", "--out", str(plain), *overrides]) == 0
    assert (
        main(
            [
                "fit",
                "--recipe",
                "leukemia_demo",
                "--out",
                str(secure),
                *overrides,
                "federation.secure_aggregation.enabled=true",
            ]
        )
        == 0
    )

    expected = load_checkpoint(plain / "checkpoints" / "last.ckpt")["state_dict"]
    got = load_checkpoint(secure / "checkpoints" / "last.ckpt")["state_dict"]
    initial_row, secure_row = read_metrics(plain)[0], read_metrics(secure)[0]
    sizes = [c["num_examples"] for c in secure_row["clients"].values()]
    step = 2 * 1.0 / 2**22
    bound = len(sizes) * step / (sum(sizes) / max(sizes)) + 1e-6
    worst = max(
        (got[k].double() - expected[k].double()).abs().max().item() for k in expected if expected[k].is_floating_point()
    )
    assert 0 < worst <= bound  # quantised (not bit-identical), yet FedAvg within the bound
    assert secure_row["test/accuracy"] == pytest.approx(initial_row["test/accuracy"], abs=0.02)
    assert secure_row[f"{CLIPPED_FRACTION}_max"] == 0.0
    assert secure_row["bytes_received"] > 0 and secure_row["bytes_sent"] > initial_row["bytes_sent"]
