import math

import torch

from fedvlm.config import load_config
from fedvlm.federation.sampling import sample_clients
from fedvlm.federation.server import learning_rate, update_norm


def test_sampling_depends_only_on_seed_and_round() -> None:
    clients = list(range(10))
    first = sample_clients(clients, 4, seed=7, server_round=3)
    assert first == sample_clients(list(reversed(clients)), 4, seed=7, server_round=3)
    assert len(first) == 4 and len(set(first)) == 4 and first == sorted(first)
    rounds = {tuple(sample_clients(clients, 4, seed=7, server_round=r)) for r in range(1, 20)}
    assert len(rounds) > 10  # different rounds draw different clients
    assert sample_clients(clients, 0, seed=7, server_round=3) == clients


def test_every_client_is_sampled_at_the_expected_rate() -> None:
    counts = [0] * 10
    for server_round in range(1, 2001):
        for pid in sample_clients(list(range(10)), 3, seed=0, server_round=server_round):
            counts[pid] += 1
    assert all(abs(c / 2000 - 0.3) < 0.04 for c in counts)


def test_linear_learning_rate_decay_with_floor() -> None:
    cfg = load_config(None, ["optim.lr=1.0", "federation.rounds=4", "optim.min_lr_fraction=0.3"])
    assert [learning_rate(cfg, r) for r in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.3]
    constant = load_config(None, ["optim.lr=0.5", "optim.lr_schedule=constant"])
    assert learning_rate(constant, 9) == 0.5


def test_update_norm_is_l2_over_float_entries() -> None:
    old = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[0.0]]), "n": torch.tensor(3)}
    new = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([[4.0]]), "n": torch.tensor(9)}
    assert update_norm(old, new) == math.sqrt(9 + 16)
