"""Byzantine-robust aggregation (trimmed mean, median, Krum) and simulated Byzantine clients."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedvlm.config import load_config
from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.byzantine import (
    Attack,
    GaussianUpdate,
    LabelFlip,
    SignFlip,
    attacks,
    byzantine_clients,
    client_attack,
    gaussian_update,
    scale_update,
    sign_flip,
)
from fedvlm.federation.robust import multikrum_select, pairwise_sq_distances
from fedvlm.federation.strategies import FedAvg, MultiKrum, RobustStrategy, strategies
from fedvlm.tasks import get_task
from fedvlm.tasks.cxr.task import CxrTask
from fedvlm.tasks.leukemia.task import LeukemiaTask

ROBUST_STRATEGIES = ("trimmed_mean", "median", "krum", "multikrum")
NO_STATE = {"w": torch.zeros(2), "n": torch.tensor(0)}  # robust rules ignore the global state


def _strategy(*overrides: str):  # type: ignore[no-untyped-def]
    return strategies.build(load_config(None, list(overrides)).federation.strategy)


def _updates(rows: list[list[float]]) -> RoundReplies:
    return RoundReplies(
        [ClientUpdate(pid, 10 * (pid + 1), {"w": torch.tensor(row)}) for pid, row in enumerate(rows)], {}
    )


def test_robust_strategies_are_exactly_the_non_linear_ones() -> None:
    robust = {name for name in strategies.names() if issubclass(strategies.get(name), RobustStrategy)}  # type: ignore[arg-type]
    assert robust == set(ROBUST_STRATEGIES)
    assert not any(strategies.get(name).linear for name in robust)  # type: ignore[attr-defined]


FIVE = [[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [4.0, 7.0], [100.0, 1.0]]


def test_trimmed_mean_of_five_clients_by_hand() -> None:
    strategy = _strategy("federation.strategy=trimmed_mean")
    aggregated = strategy.aggregate(_updates(FIVE), NO_STATE)["w"]
    # β = 0.2, n = 5: drop the lowest and highest value of each coordinate.
    # w[0]: 1 2 3 4 100 → (2+3+4)/3 = 3;  w[1]: −5 0 1 7 10 → (0+1+7)/3 = 8/3
    torch.testing.assert_close(aggregated, torch.tensor([3.0, 8.0 / 3.0]))
    assert aggregated.dtype == torch.float32


def test_trimmed_mean_with_nothing_to_trim_is_the_unweighted_mean() -> None:
    strategy = _strategy("federation.strategy={name: trimmed_mean, trim_fraction: 0.1}")  # ⌊0.1·5⌋ = 0
    torch.testing.assert_close(strategy.aggregate(_updates(FIVE), NO_STATE)["w"], torch.tensor([22.0, 13.0 / 5.0]))


def test_median_of_five_clients_by_hand_and_of_an_even_count() -> None:
    median = _strategy("federation.strategy=median")
    # w[0]: 1 2 3 4 100 → 3;  w[1]: −5 0 1 7 10 → 1
    torch.testing.assert_close(median.aggregate(_updates(FIVE), NO_STATE)["w"], torch.tensor([3.0, 1.0]))
    # four clients, mean of the two middle values (numpy's convention): 2 3 4 100 → 3.5; −5 0 1 7 → 0.5
    torch.testing.assert_close(median.aggregate(_updates(FIVE[1:]), NO_STATE)["w"], torch.tensor([3.5, 0.5]))


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_strategies_keep_integer_buffers_integer(name: str) -> None:
    strategy = _strategy(f"federation.strategy={name}")
    counts = [6, 4, 6, 8, 6]  # trimmed mean, median, mean: 6; Krum (all "w" equal, a tie): client 0
    updates = [ClientUpdate(pid, 1, {"n": torch.tensor(n), "w": torch.tensor([1.0])}) for pid, n in enumerate(counts)]
    aggregated = strategy.aggregate(RoundReplies(updates, {}), NO_STATE)
    assert aggregated["n"].dtype == torch.int64 and int(aggregated["n"]) == 6
    torch.testing.assert_close(aggregated["w"], torch.tensor([1.0]))


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_strategies_compose_with_the_fedprox_client_term(name: str) -> None:
    assert _strategy(f"federation.strategy={name}").configure_round(1) == {}
    prox = _strategy(f"federation.strategy={name}", "federation.strategy.mu=0.3")
    assert prox.configure_round(1) == {keys.PROXIMAL_MU: 0.3}


# Four honest clients near (1, 1) and one outlier. With f = 1 each score sums the n − f − 2 = 2
# smallest squared distances to the others:
#   client 0 (0,1): to 1: 1, to 2: 4, to 3: 0.25  → 0.25 + 1   = 1.25
#   client 1 (1,1): to 0: 1, to 2: 1, to 3: 0.25  → 0.25 + 1   = 1.25 (tie with 0; not chosen)
#   client 2 (2,1): to 1: 1, to 3: 2.25, to 0: 4  → 1 + 2.25   = 3.25
#   client 3 (0.5,1): to 0: 0.25, to 1: 0.25      → 0.5        ← Krum's choice
#   client 4 (50,−50): ≥ 2·2401                    → huge
KRUM_ROWS = [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [0.5, 1.0], [50.0, -50.0]]


def test_krum_picks_the_most_central_honest_update() -> None:
    krum = _strategy("federation.strategy={name: krum, byzantine_f: 1}")
    torch.testing.assert_close(krum.aggregate(_updates(KRUM_ROWS), NO_STATE)["w"], torch.tensor([0.5, 1.0]))
    states = [u.state for u in _updates(KRUM_ROWS).updates]
    assert multikrum_select(states, byzantine_f=1, num_selected=4) == [3, 0, 1, 2]


def test_multikrum_averages_the_m_best_and_leaves_the_outlier_out() -> None:
    multikrum = _strategy("federation.strategy={name: multikrum, byzantine_f: 1, num_selected: 3}")
    # clients 3, 0, 1 unweighted: ((0.5+0+1)/3, 1)
    torch.testing.assert_close(multikrum.aggregate(_updates(KRUM_ROWS), NO_STATE)["w"], torch.tensor([0.5, 1.0]))
    default_m = _strategy("federation.strategy={name: multikrum, byzantine_f: 1}")  # m = n − f = 4
    torch.testing.assert_close(default_m.aggregate(_updates(KRUM_ROWS), NO_STATE)["w"], torch.tensor([0.875, 1.0]))


def test_krum_selection_matches_flowers_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(7)]
    states[2] = {key: value * 30 for key, value in states[2].items()}
    contents = [RecordDict({keys.ARRAYS: ArrayRecord(torch_state_dict=state)}) for state in states]
    for f, m in [(0, 1), (1, 1), (2, 3)]:
        expected = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
        chosen = multikrum_select(states, byzantine_f=f, num_selected=m)
        assert [contents.index(c) for c in expected] == chosen


def test_krum_distances_are_exact_for_nearby_weights_of_large_norm() -> None:
    base = torch.full((1000,), 1000.0)
    states = [{"w": base}, {"w": base + 1e-3}]
    distances = pairwise_sq_distances(states)
    # float32 weights: 1000 + 1e-3 is stored as 1000.0009765625
    assert distances[0, 1].item() == pytest.approx(1000 * 0.0009765625**2, rel=1e-12)


def test_krum_with_too_few_updates_names_the_round_and_the_counts() -> None:
    krum = MultiKrum(byzantine_f=1)
    krum.configure_round(7)
    expected = r"round 7: Krum needs more than .* = 4 .*but 4 arrived \(clients: 0, 1, 2, 3\)"
    with pytest.raises(FederationError, match=expected):
        krum.aggregate(_updates(KRUM_ROWS[:4]), NO_STATE)


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="federation.byzantine.attack: unknown attack 'flip'; valid names: gaussian"):
        load_config(None, ["federation.byzantine.attack=flip"])
    with pytest.raises(ConfigError, match=r"federation.strategy.trim_fraction=0.5 must be in \[0, 0.5\)"):
        load_config(None, ["federation.strategy=trimmed_mean", "federation.strategy.trim_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"federation.strategy=krum needs more than .* = 8 clients per round"):
        load_config(None, ["federation.strategy={name: krum, byzantine_f: 3}", "federation.num_clients=8"])
    with pytest.raises(ConfigError, match=r"federation.byzantine.clients=\[0, 3\]: clients \[3\]"):
        load_config(
            None,
            ["federation.num_clients=3", "federation.byzantine.attack=scale", "federation.byzantine.clients=[0,3]"],
        )
    with pytest.raises(ConfigError, match="federation.byzantine.attack=gaussian names no client"):
        load_config(None, ["federation.byzantine.attack=gaussian"])
    with pytest.raises(ConfigError, match="federation.robust_proximal has moved to federation.strategy.mu"):
        load_config(None, ["federation.robust_proximal=true"])
    with pytest.raises(ConfigError, match="federation.strategy.num_selected=9 exceeds n − f = 10 − 2"):
        load_config(None, ["federation.strategy={name: multikrum, byzantine_f: 2, num_selected: 9}"])
    with pytest.raises(ConfigError, match="federation.byzantine.attack.noise_std=-1.0 must be >= 0"):
        load_config(None, ["federation.byzantine.attack={name: gaussian, noise_std: -1}"])


def test_every_attack_is_registered_with_its_options() -> None:
    assert attacks.names() == ["gaussian", "label_flip", "none", "scale", "sign_flip"]
    spec = load_config(
        None, ["federation.byzantine.attack={name: scale, scale: 4}", "federation.byzantine.clients=[0]"]
    )
    assert dict(spec.federation.byzantine.attack) == {"name": "scale", "scale": 4.0}


# -- attacks -------------------------------------------------------------------------------

GLOBAL = {"w": torch.tensor([1.0, -2.0]), "steps": torch.tensor(5)}
LOCAL = {"w": torch.tensor([1.5, -3.0]), "steps": torch.tensor(9)}  # Δ = (0.5, −1)


def test_sign_flip_sends_global_minus_scaled_update() -> None:
    sent = sign_flip(LOCAL, GLOBAL, 10.0)
    torch.testing.assert_close(sent["w"], torch.tensor([1.0 - 5.0, -2.0 + 10.0]))
    assert int(sent["steps"]) == 9  # integer entries travel as trained


def test_scale_sends_global_plus_scaled_update() -> None:
    torch.testing.assert_close(scale_update(LOCAL, GLOBAL, 10.0)["w"], torch.tensor([1.0 + 5.0, -2.0 - 10.0]))
    torch.testing.assert_close(scale_update(LOCAL, GLOBAL, 1.0)["w"], LOCAL["w"])


def test_gaussian_sends_global_plus_seeded_noise() -> None:
    sent = gaussian_update(LOCAL, GLOBAL, 2.0, torch.Generator().manual_seed(3))
    noise = torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(sent["w"], (GLOBAL["w"].double() + 2.0 * noise).float())
    assert int(sent["steps"]) == 9
    again = GaussianUpdate(noise_std=2.0).poison(LOCAL, GLOBAL, seed=3)
    torch.testing.assert_close(again["w"], sent["w"])


def test_honest_clients_send_what_they_trained() -> None:
    sent = Attack().poison(LOCAL, GLOBAL, seed=0)
    assert sent.keys() == LOCAL.keys() and all(sent[k] is LOCAL[k] for k in LOCAL)


def test_label_flip_of_a_leukemia_bundle() -> None:
    bundle = {
        "leukemia": torch.tensor([0, 1, 1, 1, 1, 1]),
        "stage": torch.tensor([-1, 0, 1, 2, 3, -1]),
        "image": torch.zeros(6, 3, 2, 2, dtype=torch.uint8),
    }
    flipped = LeukemiaTask().flip_labels(load_config(None, ["model.num_stages=4"]), bundle)
    assert flipped["leukemia"].tolist() == [1, 0, 0, 0, 0, 0]
    assert flipped["stage"].tolist() == [-1, 3, 2, 1, 0, -1]  # k → K−1−k, unknown stays
    assert flipped["image"] is bundle["image"] and bundle["leukemia"].tolist() == [0, 1, 1, 1, 1, 1]


def test_label_flip_of_a_cxr_bundle_keeps_unknowns() -> None:
    labels = torch.tensor([[1.0, 0.0, math.nan], [0.0, math.nan, 1.0]])
    flipped = CxrTask().flip_labels(load_config(None, ["task=cxr"]), {"labels": labels})["labels"]
    torch.testing.assert_close(flipped, torch.tensor([[0.0, 1.0, math.nan], [1.0, math.nan, 0.0]]), equal_nan=True)
    with pytest.raises(ConfigError, match="task=lightning cannot flip labels"):
        get_task("lightning").flip_labels(load_config(None), {"labels": labels})


def test_label_flip_poisons_the_cached_bundle_once_across_rounds() -> None:
    bundle = {"leukemia": torch.tensor([0, 1]), "stage": torch.tensor([-1, 0])}
    attack, cfg = LabelFlip(), load_config(None, ["model.num_stages=4"])
    for _ in range(3):  # three rounds in one simulation actor: a self-inverse flip must not undo itself
        attack.poison_training_data(bundle, lambda tensors: LeukemiaTask().flip_labels(cfg, tensors))
        assert bundle["leukemia"].tolist() == [1, 0] and bundle["stage"].tolist() == [-1, 3]


def test_client_attack_applies_only_to_the_named_or_drawn_clients() -> None:
    cfg = load_config(
        None,
        [
            "federation.num_clients=4",
            "federation.byzantine.attack={name: sign_flip, scale: 4}",
            "federation.byzantine.clients=[0,3]",
        ],
    )
    assert byzantine_clients(cfg.federation, cfg.seed) == [0, 3]
    assert isinstance(client_attack(cfg, 3), SignFlip) and client_attack(cfg, 3).scale == 4.0
    assert type(client_attack(cfg, 1)) is Attack

    drawn = load_config(
        None,
        ["federation.num_clients=10", "federation.byzantine.attack=label_flip", "federation.byzantine.fraction=0.3"],
    )
    chosen = byzantine_clients(drawn.federation, drawn.seed)
    assert len(chosen) == 3 and chosen == byzantine_clients(drawn.federation, drawn.seed)
    assert isinstance(client_attack(drawn, chosen[0]), LabelFlip)
    off = load_config(None, ["federation.byzantine.clients=[1]"])  # attack: none
    assert byzantine_clients(off.federation, off.seed) == []


def test_fedavg_is_not_robust_to_the_same_outlier() -> None:
    unit = [ClientUpdate(u.partition_id, 1, u.state) for u in _updates(KRUM_ROWS).updates]
    averaged = FedAvg().aggregate(RoundReplies(unit, {}), NO_STATE)
    torch.testing.assert_close(averaged["w"], torch.tensor([10.7, -9.2]))


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_trimmed_mean_and_median_bound_a_sign_flipping_client(tmp_path: Path, tiny_overrides: list[str]) -> None:
    from fedvlm.cli import main
    from fedvlm.runs import read_metrics

    attack = [
        "federation.rounds=1",
        "federation.evaluate_clients=false",
        "federation.byzantine.attack={name: sign_flip, scale: 100}",
        "federation.byzantine.clients=[1]",
    ]
    norms = {}
    specs = {"fedavg": "fedavg", "trimmed_mean": "{name: trimmed_mean, trim_fraction: 0.34}", "median": "median"}
    for strategy, spec in specs.items():
        run_dir = tmp_path / strategy
        argv = [
            "fit",
            "--recipe",
            "leukemia_demo",
            "--out",
            str(run_dir),
            *tiny_overrides,
            *attack,
            f"federation.strategy={spec}",
        ]
        assert main(argv) == 0
        (row,) = read_metrics(run_dir)
        norms[strategy] = row["update_norm"]
    # FedAvg moves by ≈ ‖Σ_k (n_k/n) Δ_k‖ with one Δ scaled by −100: tens of times an honest step.
    # With 3 clients and β = 0.34, the trimmed mean is the coordinate-wise median: a value between
    # two honest ones.
    assert np.isfinite(list(norms.values())).all()
    assert norms["fedavg"] > 10 * norms["trimmed_mean"]
    assert norms["fedavg"] > 10 * norms["median"]
    assert norms["trimmed_mean"] == pytest.approx(norms["median"], rel=1e-6)
