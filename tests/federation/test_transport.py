"""What crosses the wire: the real server and ClientApp, one round each, over an in-process grid.

Every message is recorded, so these tests check the transport itself: only parameters and
scalar metrics (or sum-reduced metric counts) leave a client, low-precision weights travel,
and central DP really clips and noises what the server aggregates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid

from fedvlm.config import load_config, save_config
from fedvlm.data.prepared import bundle_size
from fedvlm.errors import FederationError
from fedvlm.federation import client as client_module
from fedvlm.federation import keys
from fedvlm.federation.callback import travelling_keys
from fedvlm.federation.central_dp import central_epsilon, clip_update, uniform_mean
from fedvlm.federation.client import make_client_app
from fedvlm.federation.codecs import update_codecs
from fedvlm.federation.sampling import sample_clients
from fedvlm.federation.server import FederatedServer, update_norm
from fedvlm.runs import RunLayout
from fedvlm.tasks import get_task
from fedvlm.tasks.site_store import client_site
from tests.conftest import CXR_TINY, TINY_OVERRIDES
from tests.federation.conftest import InProcessGrid

RECIPES = {"leukemia_demo": TINY_OVERRIDES, "cxr_demo": CXR_TINY}


def _federation(tmp_path: Path, recipe: str, *overrides: str) -> tuple[FederatedServer, InProcessGrid]:
    cfg = load_config(recipe, [*RECIPES[recipe], "federation.rounds=1", *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    save_config(cfg, RunLayout(run_dir).config)
    task = get_task(cfg.task)
    task.prepare(cfg, run_dir)
    grid = InProcessGrid(
        make_client_app(run_dir),
        {1000 + pid: {keys.PARTITION_ID: pid} for pid in range(int(cfg.federation.num_clients))},
    )
    return FederatedServer(cfg, run_dir, task), grid


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_only_parameters_and_scalar_metrics_leave_a_client(tmp_path: Path, recipe: str) -> None:
    server, grid = _federation(tmp_path, recipe)
    server.run(cast(Grid, grid))
    run_dir = server.run_dir
    sizes = {pid: bundle_size(client_site(run_dir, pid).val) for pid in range(3)}
    assert len(set(sizes.values())) > 1  # the clients' validation splits differ in size

    model_keys = travelling_keys(server.module)
    train_replies = [m for m in grid.received if m.metadata.message_type == keys.TRAIN]
    eval_replies = [m for m in grid.received if m.metadata.message_type == keys.EVALUATE]
    assert len(train_replies) == len(eval_replies) == 3
    for reply in grid.received:
        content = reply.content
        if reply.metadata.message_type == keys.QUERY:  # the site's name and its counts, nothing else
            assert list(content.config_records) == [keys.CONFIG]
            assert list(content.config_records[keys.CONFIG]) == [keys.SITE_COUNTS]
            counts = json.loads(str(content.config_records[keys.CONFIG][keys.SITE_COUNTS]))
            assert counts["site"] == f"client_{int(content.metric_records[keys.METRICS][keys.PARTITION_ID]):03d}"
            assert all(isinstance(counts[s], int) for s in ("train", "val", "test", "num_samples"))
            numbers = [v for split in counts["by_label"].values() for v in split.values()]
            assert all(isinstance(v, int) for v in numbers)
            continue
        assert not content.config_records  # no strings or bytes (text, file names) leave a client
        for record in content.array_records.values():
            # Only model entries, each with the model's shape: no images, token ids or embeddings.
            assert set(record) <= model_keys
            for key, array in record.to_torch_state_dict().items():
                assert array.shape == server.global_state[key].shape
        for record in content.metric_records.values():
            for name, value in record.items():
                if name.startswith(keys.EVAL_STATE_PREFIX):
                    assert isinstance(value, list)
                else:
                    assert _is_scalar(value), (name, value)

    # Metric states are sum-reduced counts: their lengths do not depend on how many patients a
    # client has, so no per-sample score can hide in them.
    layouts = [
        {k: len(v) for k, v in reply.content.metric_records[keys.METRICS].items() if isinstance(v, list)}
        for reply in eval_replies
    ]
    assert layouts[0] and all(layout == layouts[0] for layout in layouts)
    for reply in eval_replies:
        state = reply.content.metric_records[keys.METRICS]
        counts = [x for k, v in state.items() if isinstance(v, list) for x in v]
        assert all(float(x).is_integer() and x >= 0 for x in counts)  # counts, not scores


def test_bfloat16_clients_send_weights_the_server_can_aggregate(tmp_path: Path) -> None:
    server, grid = _federation(tmp_path, "leukemia_demo", "trainer.precision=bf16-true")
    before = {k: v.clone() for k, v in server.global_state.items()}
    server.run(cast(Grid, grid))

    for reply in (m for m in grid.received if m.metadata.message_type == keys.TRAIN):
        for array in reply.content.array_records[keys.ARRAYS].to_torch_state_dict().values():
            assert array.dtype in (torch.float32, torch.int64)  # ArrayRecord has no bfloat16: float32, lossless
    changed = 0
    for key, value in server.global_state.items():
        assert value.dtype == before[key].dtype  # the global model stays in the server's precision
        assert torch.isfinite(value.float()).all()
        changed += int(not torch.equal(value, before[key]))
    assert changed > 0
    assert server.progress.completed_round == 1


def test_clients_whose_training_diverges_are_named_and_nothing_is_averaged(tmp_path: Path) -> None:
    # Pure float16 training (no loss scaling) of the demo overflows: the clients refuse to send
    # NaN weights, and with no update left the run stops naming them, before any round is saved.
    server, grid = _federation(tmp_path, "leukemia_demo", "trainer.precision=16-true")
    with pytest.raises(FederationError, match=r"only 0 of 3 clients answered.*client 0: .*non-finite weights"):
        server.run(cast(Grid, grid))
    assert server.progress.completed_round == 0
    assert not (server.run_dir / "checkpoints" / "last.ckpt").exists()


def test_the_server_leaves_out_an_update_with_nan(tmp_path: Path) -> None:
    server, grid = _federation(tmp_path, "leukemia_demo")
    honest_send = grid.send_and_receive

    def poisoned(messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = honest_send(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.message_type == keys.TRAIN and reply.metadata.src_node_id == 1001:
                record = reply.content.array_records[keys.ARRAYS]
                state = record.to_torch_state_dict()
                name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
                state[name][0] = float("nan")
                reply.content.array_records[keys.ARRAYS] = ArrayRecord(torch_state_dict=state)
        return replies

    grid.send_and_receive = poisoned  # type: ignore[method-assign]
    server.run(cast(Grid, grid))
    row = server.progress.history[-1]
    assert row["num_clients"] == 2 and "non-finite" in row["failed_clients"]["1"]
    assert all(torch.isfinite(v.float()).all() for v in server.global_state.values())


def _client_states(grid: InProcessGrid) -> dict[int, dict[str, torch.Tensor]]:
    replies = [m for m in grid.received if m.metadata.message_type == keys.TRAIN]
    return {
        int(r.content.metric_records[keys.METRICS][keys.PARTITION_ID]): r.content.array_records[  # type: ignore[arg-type]
            keys.ARRAYS
        ].to_torch_state_dict()
        for r in replies
    }


def test_server_side_central_dp_is_the_uniform_mean_of_clipped_updates(tmp_path: Path) -> None:
    norm = 0.05
    server, grid = _federation(
        tmp_path,
        "leukemia_demo",
        "privacy.central.clipping=server",
        f"privacy.central.clipping_norm={norm}",
        "privacy.central.noise_multiplier=0",
        "data.partition.name=dirichlet",
    )
    before = {k: v.clone() for k, v in server.global_state.items()}
    server.run(cast(Grid, grid))

    states = _client_states(grid)
    raw_norms = [update_norm(before, s) for s in states.values()]
    assert min(raw_norms) > 10 * norm  # every client really was clipped
    clipped = [clip_update(s, {k: before[k] for k in s}, norm)[0] for _, s in sorted(states.items())]
    expected = uniform_mean(clipped)
    for key, value in expected.items():
        torch.testing.assert_close(server.global_state[key], value.to(before[key].dtype), rtol=0, atol=1e-6)
    row = server.progress.history[-1]
    assert row[keys.CENTRAL_EPSILON] == math.inf  # σ = 0 protects nothing, and says so


def test_central_noise_has_the_calibrated_scale_and_epsilon_is_logged(tmp_path: Path) -> None:
    norm, sigma = 0.05, 1.0
    server, grid = _federation(
        tmp_path,
        "leukemia_demo",
        "privacy.central.clipping=server",
        f"privacy.central.clipping_norm={norm}",
        f"privacy.central.noise_multiplier={sigma}",
    )
    before = {k: v.clone() for k, v in server.global_state.items()}
    server.run(cast(Grid, grid))

    states = _client_states(grid)
    clipped = [clip_update(s, {k: before[k] for k in s}, norm)[0] for _, s in sorted(states.items())]
    noiseless = uniform_mean(clipped)
    noise = torch.cat([(server.global_state[k].double() - noiseless[k].double()).flatten() for k in noiseless])
    expected_std = sigma * norm / len(states)
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) / expected_std - 1) < 0.05
    assert abs(float(noise.mean())) < 0.05 * expected_std
    row = server.progress.history[-1]
    assert row[keys.CENTRAL_EPSILON] == pytest.approx(central_epsilon(sigma, 1.0, 1, 1e-5))


def test_client_side_clipping_bounds_what_leaves_and_composes_with_secagg(tmp_path: Path) -> None:
    norm = 0.05
    server, grid = _federation(
        tmp_path,
        "leukemia_demo",
        "privacy.central.clipping=client",
        f"privacy.central.clipping_norm={norm}",
        "privacy.central.noise_multiplier=0",
        "federation.secure_aggregation.enabled=true",
        "data.partition.name=dirichlet",
    )
    before = {k: v.clone() for k, v in server.global_state.items()}
    server.run(cast(Grid, grid))

    # Under SecAgg+ nothing the server received holds a client's weights ...
    assert all(len(r) == 0 for m in grid.received for r in m.content.array_records.values())
    # ... and the new global model moved by the uniform mean of clipped updates: at most C.
    moved = update_norm(before, server.global_state)
    assert 0.2 * norm < moved <= norm * (1 + 1e-3)
    row = server.progress.history[-1]
    assert keys.CENTRAL_EPSILON in row and row["num_clients"] == 3
    # The clients still report their true example counts in the clear.
    assert sorted(c["num_examples"] for c in row["clients"].values()) == sorted(server.client_sizes.values())


def test_server_momentum_survives_a_resume(tmp_path: Path) -> None:
    """FedAvgM's velocity is saved with every round: 2 rounds + resume = 3 rounds straight."""
    straight_server, straight_grid = _federation(
        tmp_path / "a", "leukemia_demo", "federation.strategy=fedavgm", "federation.rounds=3"
    )
    straight_server.run(cast(Grid, straight_grid))

    # Every client fails in round 3 (the lr schedule depends on the number of rounds: keep it).
    broken, grid = _federation(
        tmp_path / "b",
        "leukemia_demo",
        "federation.strategy=fedavgm",
        "federation.rounds=3",
        "federation.min_clients=3",
        "federation.faults=[0@3,1@3,2@3]",
    )
    with pytest.raises(FederationError, match="round 3"):
        broken.run(cast(Grid, grid))
    cfg = load_config(RunLayout(broken.run_dir).config, ["federation.faults=[]"])
    save_config(cfg, RunLayout(broken.run_dir).config)  # the ClientApps read the run's config ...
    client_module._run_config.cache_clear()  # ... afresh, as new ClientApp processes would
    resumed = FederatedServer(cfg, broken.run_dir, get_task(cfg.task), resume=True)
    resumed.run(cast(Grid, grid))

    assert resumed.progress.completed_round == 3
    for key, value in straight_server.global_state.items():
        torch.testing.assert_close(resumed.global_state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("recipe", "codec_spec", "budget"),
    [
        ("leukemia_demo", {"name": "int4", "block": 64}, 0.2),  # 4 bits + 4/64 bytes an entry
        ("cxr_demo", {"name": "topk", "fraction": 0.05, "bits": 8, "error_feedback": True}, 0.05),
    ],
)
def test_compressed_updates_are_decoded_and_averaged_by_the_server(
    tmp_path: Path, recipe: str, codec_spec: dict[str, Any], budget: float
) -> None:
    """Compressed end to end, on both tasks: each client's reply is a fraction of float32, and the
    new global state is the FedAvg of the replies decoded against the weights they started from."""
    server, grid = _federation(tmp_path, recipe, f"federation.codec={json.dumps(codec_spec)}")
    before = {k: v.clone() for k, v in server.global_state.items() if k in server.downlink_keys}
    server.run(cast(Grid, grid))
    replies = [r.content for r in grid.received if r.metadata.message_type == keys.TRAIN]
    codec = update_codecs.build(codec_spec)
    decoded, weights = [], []
    float_bytes = sum(4 * v.numel() for v in before.values() if v.is_floating_point())
    for content in replies:
        record = content.array_records[keys.ARRAYS]
        assert record.count_bytes() < budget * float_bytes
        for key in server.exact_keys:  # running statistics travel as they are, never compressed
            assert record[key].numpy().dtype == before[key].numpy().dtype
        decoded.append(codec.decode(record, before))
        weights.append(float(content.metric_records[keys.METRICS][keys.NUM_EXAMPLES]))  # type: ignore[arg-type]
    total = sum(weights)
    for key in decoded[0]:
        if before[key].is_floating_point():
            expected = sum(w * d[key].double() for w, d in zip(weights, decoded, strict=True)) / total
            torch.testing.assert_close(server.global_state[key].double(), expected, rtol=0, atol=1e-6)
    variances = [v for k, v in server.global_state.items() if k.endswith("running_var")]
    assert (recipe == "leukemia_demo" or variances) and all(bool((v >= 0).all()) for v in variances)


def test_error_feedback_residuals_live_in_node_state_across_fresh_client_apps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Top-k with error feedback over two rounds, a new ClientApp for every message (as the
    deployment engine starts one per message): each client's round-2 encoding starts from the
    residual its round-1 encoding left in its node state, and nothing else carries it."""
    server, grid = _federation(
        tmp_path,
        "leukemia_demo",
        "federation.rounds=2",
        "federation.codec={name: topk, fraction: 0.01, bits: 8, error_feedback: true}",
    )

    class FreshApps:  # a new ClientApp per message; only the node's Context persists
        def __call__(self, message: Message, context: Context) -> Message:
            return make_client_app(server.run_dir)(message, context)

    grid.app = cast(Any, FreshApps())
    calls: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    real = client_module.encode_update

    def recording(codec: Any, local: Any, reference: Any, seed: int, residual: Any = None, exact: Any = ()) -> Any:
        record, new = real(codec, local, reference, seed, residual, exact)
        calls.append((seed, dict(residual or {}), {k: v.clone() for k, v in new.items()}))
        return record, new

    monkeypatch.setattr(client_module, "encode_update", recording)
    server.run(cast(Grid, grid))
    clients = len(grid.node_configs)
    assert len(calls) == 2 * clients
    first, second = calls[:clients], calls[clients:]
    for (_, before, left), (_, carried, _) in zip(first, second, strict=True):
        assert before == {}  # round 1 starts with nothing held back
        assert set(carried) == set(left) and all(torch.equal(carried[k], left[k]) for k in left)
        assert max(float(v.abs().max()) for v in left.values()) > 0
    for context in grid.contexts.values():
        assert keys.CODEC_RESIDUAL in context.state.array_records


def test_federated_evaluation_samples_clients_and_rounds(tmp_path: Path) -> None:
    """``evaluate_every=2``, one client a round: round 1 asks nobody, round 2 the seeded sample of
    one, the last round every client (the run's final metrics are over all sites)."""
    server, grid = _federation(
        tmp_path,
        "leukemia_demo",
        "federation.rounds=3",
        "federation.evaluate_clients_per_round=1",
        "federation.evaluate_every=2",
    )
    server.run(cast(Grid, grid))
    node_to_pid = {node: int(config[keys.PARTITION_ID]) for node, config in grid.node_configs.items()}
    asked: list[list[int]] = [[] for _ in range(3)]
    trained = 0
    for message in grid.sent:  # train messages open each round; evaluate messages follow them
        if message.metadata.message_type == keys.TRAIN:
            trained += 1
        elif message.metadata.message_type == keys.EVALUATE:
            asked[(trained - 1) // 3].append(node_to_pid[message.metadata.dst_node_id])
    expected = sample_clients([0, 1, 2], 1, int(server.cfg.seed) * 7 + 1, 2)
    assert [sorted(a) for a in asked] == [[], expected, [0, 1, 2]]
    rows = server.progress.history
    assert "val/accuracy" not in rows[0] and "evaluated_clients" not in rows[0]
    assert rows[1]["evaluated_clients"] == 1
    assert [pid for pid, c in rows[1]["clients"].items() if "val/accuracy" in c] == [str(expected[0])]
    assert rows[2]["evaluated_clients"] == 3 and "test/accuracy" in rows[2]
