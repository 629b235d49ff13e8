"""Central (update-level) DP: clipping, uniform mean and noise against hand-computed values, ε against Opacus."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.central_dp import CentralDP, add_central_noise, central_epsilon, clip_update, uniform_mean
from fedvlm.federation.strategies import FedAvgM, FedProx, Median


def test_clip_update_scales_a_3_4_0_delta_of_norm_5_to_the_clipping_norm() -> None:
    reference = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([[2.0]]), "steps": torch.tensor(3)}
    # Δ = (3, 4) in "a" and (0) in "b": one joint norm of 5 over both entries
    local = {"a": torch.tensor([4.0, 5.0]), "b": torch.tensor([[2.0]]), "steps": torch.tensor(10)}
    clipped, norm = clip_update(local, reference, clipping_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([1.6, 1.8]))
    assert torch.equal(clipped["b"], torch.tensor([[2.0]]))
    assert torch.equal(clipped["steps"], torch.tensor(10))  # integer entries: the local value, untouched
    assert clipped["a"].dtype == torch.float32 and list(clipped) == ["a", "b", "steps"]
    delta = torch.cat([(clipped[k] - reference[k]).flatten() for k in ("a", "b")])
    assert delta.norm().item() == pytest.approx(1.0)


def test_clip_update_norm_is_joint_over_entries_not_per_entry() -> None:
    reference = {"a": torch.zeros(1), "b": torch.zeros(1)}
    clipped, norm = clip_update({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, reference, 2.5)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].item() == pytest.approx(1.5) and clipped["b"].item() == pytest.approx(2.0)


def test_an_update_inside_the_ball_is_returned_unchanged() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = {"w": torch.randn(50, generator=generator), "h": torch.randn(3, 4, generator=generator)}
    local = {key: value + 1e-3 * torch.randn(value.shape, generator=generator) for key, value in reference.items()}
    clipped, norm = clip_update(local, reference, clipping_norm=1.0)
    assert 0 < norm < 1.0
    assert all(torch.equal(clipped[key], local[key]) for key in local)
    same, zero_norm = clip_update(reference, reference, clipping_norm=1.0)  # Δ = 0: no division by zero
    assert zero_norm == 0.0 and all(torch.equal(same[key], reference[key]) for key in reference)


def test_clip_update_rejects_mismatched_states_and_a_non_positive_norm() -> None:
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        clip_update({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="has shape"):
        clip_update({"a": torch.zeros(3)}, {"a": torch.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        clip_update({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, 0.0)


def test_uniform_mean_ignores_client_size_and_keeps_dtypes() -> None:
    states = [
        {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(1)},
        {"w": torch.tensor([2.0, 4.0]), "steps": torch.tensor(2)},
        {"w": torch.tensor([6.0, 0.0]), "steps": torch.tensor(4)},
    ]
    mean = uniform_mean(states)
    assert torch.allclose(mean["w"], torch.tensor([3.0, 2.0]))
    assert mean["steps"].dtype == torch.int64 and mean["steps"].item() == 2  # 7/3 truncated
    with pytest.raises(ValueError, match="zero client states"):
        uniform_mean([])
    with pytest.raises(ValueError, match=r"client state 1 .* missing \['steps'\]"):
        uniform_mean([states[0], {"w": torch.zeros(2)}])


def test_noise_std_is_sigma_c_over_m_and_lands_on_the_delta() -> None:
    noise_multiplier, clipping_norm, num_clients = 1.3, 0.8, 4
    expected_std = noise_multiplier * clipping_norm / num_clients  # 0.26
    reference = {"w": torch.full((200_000,), 5.0), "b": torch.full((100, 100), -2.0), "steps": torch.tensor(9)}
    aggregate = {"w": torch.full((200_000,), 5.5), "b": torch.full((100, 100), -2.0), "steps": torch.tensor(9)}
    noised = add_central_noise(
        aggregate, reference, noise_multiplier, clipping_norm, num_clients, torch.Generator().manual_seed(1)
    )
    noise = torch.cat([(noised["w"] - aggregate["w"]).flatten(), (noised["b"] - aggregate["b"]).flatten()]).double()
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert abs(noise.mean().item()) < 5 * expected_std / math.sqrt(noise.numel())
    assert (noised["b"] != aggregate["b"]).all()  # every float coordinate, even where Δ = 0
    assert torch.equal(noised["steps"], torch.tensor(9)) and noised["w"].dtype == torch.float32


def test_same_generator_seed_gives_the_same_noise_and_another_seed_does_not() -> None:
    reference = {"w": torch.zeros(1000), "v": torch.ones(10)}
    aggregate = {"w": torch.ones(1000), "v": torch.ones(10)}

    def noised(seed: int) -> dict[str, torch.Tensor]:
        return add_central_noise(aggregate, reference, 1.0, 1.0, 3, torch.Generator().manual_seed(seed))

    first, again, other = noised(7), noised(7), noised(8)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["w"], other["w"])


def test_zero_noise_multiplier_returns_exactly_the_uniform_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = {"w": torch.randn(30, generator=generator)}
    states = [{"w": reference["w"] + torch.randn(30, generator=generator)} for _ in range(3)]
    clipped = [clip_update(state, reference, 0.5)[0] for state in states]
    mean = uniform_mean(clipped)
    noised = add_central_noise(mean, reference, 0.0, 0.5, len(clipped), torch.Generator().manual_seed(3))
    assert torch.equal(noised["w"], mean["w"])
    # and the mean of clipped updates moved the model by at most C (each Δ_k has norm ≤ C)
    assert (mean["w"] - reference["w"]).norm().item() <= 0.5 + 1e-6


def test_add_central_noise_validates_its_arguments() -> None:
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=">= 0"):
        add_central_noise(state, state, -1.0, 1.0, 2, torch.Generator())
    with pytest.raises(ValueError, match="number of clients 0"):
        add_central_noise(state, state, 1.0, 1.0, 0, torch.Generator())


@pytest.mark.parametrize(
    ("noise_multiplier", "sample_rate", "rounds"), [(1.1, 0.3, 20), (0.8, 1.0, 5), (2.0, 0.05, 300)]
)
def test_central_epsilon_equals_opacus_rdp_accountant(noise_multiplier: float, sample_rate: float, rounds: int) -> None:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    expected = accountant.get_epsilon(delta=1e-5)
    assert central_epsilon(noise_multiplier, sample_rate, rounds, 1e-5) == pytest.approx(expected, rel=1e-9)


def test_central_epsilon_grows_with_rounds_and_is_infinite_without_noise() -> None:
    epsilons = [central_epsilon(1.0, 0.5, rounds, 1e-5) for rounds in (0, 1, 5, 20, 100)]
    assert epsilons[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(epsilons))
    assert central_epsilon(0.0, 0.5, 10, 1e-5) == math.inf
    with pytest.raises(ValueError, match=r"sample rate 0.0 must be in \(0, 1\]"):
        central_epsilon(1.0, 0.0, 10, 1e-5)


def test_central_dp_wraps_only_linear_aggregators() -> None:
    settings = load_config(None, ["privacy.central.clipping=server"]).privacy.central
    CentralDP(FedProx(mu=0.1), settings)
    with pytest.raises(
        ConfigError, match=r"privacy\.central\.clipping needs a linear federation\.strategy .*not Median"
    ):
        CentralDP(Median(), settings)


def test_central_dp_wrapper_clips_averages_uniformly_and_keeps_the_inner_server_update() -> None:
    settings = load_config(
        None,
        ["privacy.central.clipping=server", "privacy.central.clipping_norm=1", "privacy.central.noise_multiplier=0"],
    ).privacy.central
    wrapped = CentralDP(FedAvgM(server_learning_rate=1.0, server_momentum=0.0), settings)
    assert wrapped.linear and wrapped.configure_round(1) == {keys.UNIFORM_WEIGHTS: True}
    global_state = {"w": torch.zeros(2)}
    # Δ = (3, 4) has norm 5 → clipped to (0.6, 0.8); Δ = (0, 0.5) stays; sizes 1 and 99 do not weigh
    replies = RoundReplies(
        [ClientUpdate(0, 1, {"w": torch.tensor([3.0, 4.0])}), ClientUpdate(1, 99, {"w": torch.tensor([0.0, 0.5])})], {}
    )
    aggregated = wrapped.aggregate(replies, global_state)
    torch.testing.assert_close(aggregated["w"], torch.tensor([0.3, 0.65]))
    torch.testing.assert_close(wrapped.server_update(global_state, aggregated)["w"], torch.tensor([0.3, 0.65]))
    assert wrapped.round_metrics(3, 0.5)[keys.CENTRAL_EPSILON] == math.inf  # σ = 0: nothing is private
    client = load_config(None, ["privacy.central.clipping=client", "privacy.central.clipping_norm=2"]).privacy.central
    assert CentralDP(FedProx(mu=0.1), client).configure_round(1) == {
        keys.PROXIMAL_MU: 0.1,
        keys.UNIFORM_WEIGHTS: True,
        keys.CENTRAL_CLIPPING_NORM: 2.0,
    }


def test_central_dp_config_defaults_and_coexists_with_dp_sgd() -> None:
    central = load_config(None).privacy.central
    defaults = (central.clipping, central.clipping_norm, central.noise_multiplier, central.delta)
    assert defaults == ("none", 1.0, 1.0, 1e-5)
    both = ["privacy.central.clipping=client", "privacy.dp=true", "privacy.central.noise_multiplier=0"]
    cfg = load_config(None, both)
    assert cfg.privacy.central.clipping == "client" and cfg.privacy.dp
    assert keys.CENTRAL_EPSILON == "privacy/central_epsilon"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["privacy.central.clipping=both"], "privacy.central.clipping='both' is not one of: none, server, client"),
        (["privacy.central.clipping_norm=0"], "privacy.central.clipping_norm=0.0 must be positive"),
        (["privacy.central.noise_multiplier=-0.5"], "privacy.central.noise_multiplier=-0.5 must be >= 0"),
        (["privacy.central.delta=1"], r"privacy.central.delta=1.0 must be in \(0, 1\)"),
        (["privacy.central.delta=0"], r"privacy.central.delta=0.0 must be in \(0, 1\)"),
        (["privacy.central.clipin=server"], "Key 'clipin' not in 'CentralDPConfig'"),
        (
            ["privacy.central.clipping=server", "federation.strategy={name: krum, byzantine_f: 1}"],
            r"privacy.central.clipping needs a linear federation.strategy \(fedavg, fedavgm, fedprox\), not 'krum'",
        ),
    ],
)
def test_central_dp_config_errors_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
