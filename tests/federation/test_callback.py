import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedvlm.errors import FederationError
from fedvlm.federation.callback import FederatedRoundCallback, load_global_state, travelling_keys


class Regression(L.LightningModule):
    """A linear model pulled towards a target; small enough to check FedProx by hand."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.frozen = torch.nn.Linear(1, 1)
        self.frozen.requires_grad_(False)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.linear(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def quiet_trainer(callbacks: list[L.Callback], **limits: int) -> L.Trainer:
    """A CPU Trainer that writes nothing, stopping at ``limits`` (``max_epochs`` / ``max_steps``)."""
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        accelerator="cpu",
        **limits,
    )


def fit(module: L.LightningModule, callback: FederatedRoundCallback, epochs: int = 20) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[2.0], [-1.0], [0.5]]) + 3.0
    quiet_trainer([callback], max_epochs=epochs).fit(module, DataLoader(TensorDataset(x, y), batch_size=16))


def global_weights() -> dict[str, torch.Tensor]:
    return {"linear.weight": torch.zeros(1, 3), "linear.bias": torch.zeros(1)}


def distance_to_global(state: dict[str, torch.Tensor]) -> float:
    reference = global_weights()
    return sum(float((state[k] - reference[k]).norm() ** 2) for k in reference) ** 0.5


def test_callback_loads_global_weights_and_returns_trainable_keys() -> None:
    module = Regression()
    callback = FederatedRoundCallback(global_weights())
    fit(module, callback, epochs=1)
    assert set(callback.local_state) == {"linear.weight", "linear.bias"}  # frozen layer stays home
    assert distance_to_global(callback.local_state) > 0


def test_fedprox_term_really_pulls_towards_the_global_model() -> None:
    distances = {}
    for mu in (0.0, 1.0, 10.0):
        callback = FederatedRoundCallback(global_weights(), proximal_mu=mu)
        fit(Regression(), callback)
        distances[mu] = distance_to_global(callback.local_state)
    assert distances[0.0] > distances[1.0] > distances[10.0]
    # The minimiser of MSE + μ/2‖w‖² shrinks towards 0; with μ=10 the weights stay small.
    assert distances[10.0] < 0.5 * distances[0.0]


def test_proximal_gradient_is_mu_times_distance() -> None:
    module = Regression()
    callback = FederatedRoundCallback(global_weights(), proximal_mu=0.5)
    callback.on_fit_start(None, module)  # type: ignore[arg-type]
    with torch.no_grad():
        module.linear.weight.copy_(torch.tensor([[1.0, 2.0, -2.0]]))
    module.linear.weight.grad = torch.zeros(1, 3)
    callback.on_before_optimizer_step(None, module, None)  # type: ignore[arg-type]
    torch.testing.assert_close(module.linear.weight.grad, torch.tensor([[0.5, 1.0, -1.0]]))


def test_travelling_keys_follow_requires_grad_and_float_buffers() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module[0].requires_grad_(False)
    assert travelling_keys(module) == {"1.weight", "1.bias", "1.running_mean", "1.running_var"}


def test_load_global_state_names_unknown_and_misshapen_keys() -> None:
    module = Regression()
    with pytest.raises(FederationError, match="keys the model does not have: \\['nope'\\]"):
        load_global_state(module, {"nope": torch.zeros(1)})
    with pytest.raises(FederationError, match="wrong shape for: \\['linear.weight'\\]"):
        load_global_state(module, {"linear.weight": torch.zeros(3, 1)})


class TwoPart(L.LightningModule):
    """A backbone and a head, with its own optimiser and learning rate, and no fedvlm method."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Linear(2, 2, bias=False)
        self.head = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.eye(2))
            self.head.weight.fill_(0.0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self.head(self.backbone(x)) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=123.0)


def one_step(module: L.LightningModule, callbacks: list[L.Callback]) -> None:
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])
    quiet_trainer(callbacks, max_steps=1).fit(module, DataLoader(TensorDataset(x, y), batch_size=1))


def test_freezing_and_the_round_learning_rate_are_callbacks_on_a_plain_module() -> None:
    from fedvlm.federation.callback import FreezeModules, RoundLearningRate

    module = TwoPart()
    one_step(module, [FreezeModules(True, ["backbone"]), RoundLearningRate(0.5)])
    # loss (w·x − 1)², x = (1, 2), w = 0: gradient 2·(0 − 1)·x = (−2, −4); one SGD step of 0.5
    torch.testing.assert_close(module.head.weight, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(module.backbone.weight, torch.eye(2))  # frozen: untouched
    assert travelling_keys(module) == {"head.weight"}  # frozen weights do not travel
    one_step(module, [FreezeModules(False, ["backbone"]), RoundLearningRate(0.5)])
    assert travelling_keys(module) == {"head.weight", "backbone.weight"}


def test_freezing_a_submodule_the_module_lacks_is_an_error_naming_it() -> None:
    from fedvlm.errors import ConfigError
    from fedvlm.federation.callback import FreezeModules

    with pytest.raises(
        ConfigError, match=r"'image_encoder', which TwoPart does not have \(submodules: backbone, head\)"
    ):
        one_step(TwoPart(), [FreezeModules(True, ["image_encoder"])])
