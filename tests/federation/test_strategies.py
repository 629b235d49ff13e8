import pytest
import torch

from fedvlm.errors import FederationError
from fedvlm.federation import keys
from fedvlm.federation.strategies import ClientUpdate, FedAvg, FedAvgM, FedProx, strategies


def test_fedavg_weights_by_client_size_eq4() -> None:
    updates = [
        ClientUpdate(0, 10, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}),
        ClientUpdate(1, 30, {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor(4.0)}),
        ClientUpdate(2, 60, {"w": torch.tensor([-1.0, 0.0]), "b": torch.tensor(1.0)}),
    ]
    aggregated = FedAvg().aggregate(updates)
    # w = 0.1·[1,2] + 0.3·[3,6] + 0.6·[-1,0] = [0.4, 2.0]; b = 0.3·4 + 0.6·1 = 1.8
    torch.testing.assert_close(aggregated["w"], torch.tensor([0.4, 2.0]))
    torch.testing.assert_close(aggregated["b"], torch.tensor(1.8))
    assert aggregated["w"].dtype == torch.float32


def test_fedavg_keeps_integer_buffers_integer() -> None:
    updates = [ClientUpdate(0, 1, {"n": torch.tensor(4)}), ClientUpdate(1, 1, {"n": torch.tensor(6)})]
    aggregated = FedAvg().aggregate(updates)
    assert aggregated["n"].dtype == torch.int64 and int(aggregated["n"]) == 5


def test_fedprox_aggregates_like_fedavg_and_sends_mu() -> None:
    updates = [ClientUpdate(0, 1, {"w": torch.tensor([0.0])}), ClientUpdate(1, 3, {"w": torch.tensor([4.0])})]
    prox = FedProx(0.25)
    torch.testing.assert_close(prox.aggregate(updates)["w"], FedAvg().aggregate(updates)["w"])
    assert prox.client_config(1) == {keys.PROXIMAL_MU: 0.25}
    assert FedAvg().client_config(1) == {}


def test_registry_builds_strategies_from_the_config() -> None:
    assert isinstance(strategies.create("fedprox", {"proximal_mu": 0.1}), FedProx)
    with pytest.raises(KeyError, match="valid names: fedavg, fedavgm, fedprox"):
        strategies.create("fedsgd", {})
    with pytest.raises(ValueError, match="zero client updates"):
        FedAvg().aggregate([])


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
