import pytest
import torch

from fedvlm.config import load_config
from fedvlm.errors import ConfigError, FederationError
from fedvlm.federation import keys
from fedvlm.federation.aggregation import ClientUpdate, RoundReplies
from fedvlm.federation.strategies import FedAvg, FedAvgM, FedProx, strategies

NO_STATE: dict[str, torch.Tensor] = {}


def _replies(updates: list[ClientUpdate]) -> RoundReplies:
    return RoundReplies(updates, {})


def test_fedavg_weights_by_client_size_eq4() -> None:
    updates = [
        ClientUpdate(0, 10, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}),
        ClientUpdate(1, 30, {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(4.0)}),
        ClientUpdate(2, 60, {"w": torch.tensor([-1.0, 0.0]), "b": torch.tensor(1.0)}),
    ]
    aggregated = FedAvg().aggregate(_replies(updates), NO_STATE)
    # w = 0.1·[1,2] + 0.3·[3,6] + 0.6·[-1,0] = [0.4, 2.0]; b = 0.3·4 + 0.6·1 = 1.8
    torch.testing.assert_close(aggregated["w"], torch.tensor([0.4, 2.0]))
    torch.testing.assert_close(aggregated["b"], torch.tensor(1.8))
    assert aggregated["w"].dtype == torch.float32


def test_fedavg_keeps_integer_buffers_integer() -> None:
    updates = [ClientUpdate(0, 1, {"n": torch.tensor(4)}), ClientUpdate(1, 1, {"n": torch.tensor(6)})]
    aggregated = FedAvg().aggregate(_replies(updates), NO_STATE)
    assert aggregated["n"].dtype == torch.int64 and int(aggregated["n"]) == 5


def test_fedprox_aggregates_like_fedavg_and_sends_mu() -> None:
    updates = [ClientUpdate(0, 1, {"w": torch.tensor([0.0])}), ClientUpdate(1, 3, {"w": torch.tensor([4.0])})]
    prox = FedProx(mu=0.25)
    torch.testing.assert_close(
        prox.aggregate(_replies(updates), NO_STATE)["w"], FedAvg().aggregate(_replies(updates), NO_STATE)["w"]
    )
    assert prox.configure_round(1) == {keys.PROXIMAL_MU: 0.25}
    assert FedAvg().configure_round(1) == {}


def test_registry_builds_strategies_from_the_config() -> None:
    built = strategies.build(load_config(None, ["federation.strategy={name: fedprox, mu: 0.1}"]).federation.strategy)
    assert isinstance(built, FedProx) and built.mu == 0.1
    momentum = load_config(None, ["federation.strategy=fedavgm", "federation.strategy.server_momentum=0.5"])
    assert dict(momentum.federation.strategy) == {
        "name": "fedavgm",
        "server_learning_rate": 1.0,
        "server_momentum": 0.5,
    }
    with pytest.raises(
        ConfigError, match="federation.strategy: unknown strategy 'fedsgd'; valid names: fedavg, fedavgm"
    ):
        load_config(None, ["federation.strategy=fedsgd"])
    with pytest.raises(ConfigError, match=r"federation.strategy.server_momentum=1.0 must be in \[0, 1\)"):
        load_config(None, ["federation.strategy={name: fedavgm, server_momentum: 1}"])
    with pytest.raises(ConfigError, match="federation.strategy.mu: not an option of strategy 'fedavg'"):
        load_config(None, ["federation.strategy={name: fedavg, mu: 0.1}"])
    with pytest.raises(ValueError, match="zero client updates"):
        FedAvg().aggregate(_replies([]), NO_STATE)


def test_naming_a_strategy_starts_from_its_own_defaults() -> None:
    cfg = load_config("cxr_demo", ["federation.strategy=median"])  # the recipe's fedprox μ does not follow
    assert dict(cfg.federation.strategy) == {"name": "median", "mu": 0.0}
    cfg = load_config("cxr_demo", ["federation.strategy.mu=0.2"])  # an option alone keeps the recipe's strategy
    assert dict(cfg.federation.strategy) == {"name": "fedprox", "mu": 0.2}


def test_fedavg_of_a_secure_round_is_the_global_state_plus_the_mean_delta() -> None:
    replies = RoundReplies([ClientUpdate(0, 2, {}), ClientUpdate(1, 6, {})], {}, mean_delta={"w": torch.tensor([0.5])})
    aggregated = FedAvg().aggregate(replies, {"w": torch.tensor([1.0])})
    assert aggregated["w"].item() == 1.5


def test_fedavgm_momentum_by_hand() -> None:
    strategy = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    previous = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    # round 1: Δ = previous − aggregate = [0.4, −0.2], v = Δ, w = previous − 0.5·v
    first = strategy.server_update(previous, {"w": torch.tensor([0.6, 2.2]), "n": torch.tensor(5)})
    torch.testing.assert_close(first["w"], torch.tensor([0.8, 2.1]))
    assert first["n"].item() == 5 and first["n"].dtype == torch.int64  # integer buffers pass through
    # round 2: Δ = [0.8, 2.1] − [0.7, 2.1] = [0.1, 0], v = 0.9·[0.4, −0.2] + Δ = [0.46, −0.18]
    second = strategy.server_update(first, {"w": torch.tensor([0.7, 2.1]), "n": torch.tensor(5)})
    torch.testing.assert_close(second["w"], torch.tensor([0.8 - 0.23, 2.1 + 0.09]))


def test_fedavgm_without_momentum_is_fedavg() -> None:
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    previous = {"w": torch.tensor([1.0, 2.0])}
    for target in ([0.5, 1.0], [3.0, -1.0]):
        aggregate = {"w": torch.tensor(target)}
        previous = strategy.server_update(previous, aggregate)
        torch.testing.assert_close(previous["w"], aggregate["w"])


def test_fedavgm_state_round_trips() -> None:
    strategy = FedAvgM(1.0, 0.9)
    strategy.server_update({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])})
    restored = FedAvgM(1.0, 0.9)
    restored.load_state_dict(strategy.state_dict())
    nxt = {"w": torch.tensor([-1.0])}
    torch.testing.assert_close(
        restored.server_update({"w": torch.tensor([0.0])}, nxt), strategy.server_update({"w": torch.tensor([0.0])}, nxt)
    )
    with pytest.raises(FederationError, match="FedAvg keeps no server state"):
        FedAvg().load_state_dict(strategy.state_dict())
