import pytest
import torch

from fedvlm.federation import keys
from fedvlm.federation.strategies import ClientUpdate, FedAvg, FedProx, strategies


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
    with pytest.raises(KeyError, match="valid names: fedavg, fedprox"):
        strategies.create("fedsgd", {})
    with pytest.raises(ValueError, match="zero client updates"):
        FedAvg().aggregate([])
