"""DP-SGD on a real Lightning Trainer: steps accounted, FedProx pull, rejected layers and tasks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedvlm.config import load_config
from fedvlm.errors import ConfigError, PrivacyBudgetExhausted
from fedvlm.federation.callback import FederatedRoundCallback
from fedvlm.federation.client import _private_training
from fedvlm.federation.sampling import sample_clients
from fedvlm.models.encoders import build_text_encoder
from fedvlm.privacy import PrivacyLedger, PrivateTraining, check_private_trainable, compute_epsilon
from fedvlm.privacy.dp import batch_shaped_ids

PRIVACY: dict[str, Any] = {
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "delta": 1e-5,
    "accountant": "rdp",
    "max_epsilon": None,
    "poisson_sampling": True,
    "grad_sample_mode": "hooks",
}


class Regression(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_loader(n: int = 50, batch_size: int = 8) -> DataLoader[Any]:
    torch.manual_seed(0)
    x = torch.randn(n, 3)
    return DataLoader(TensorDataset(x, x @ torch.tensor([2.0, -1.0, 0.5]) + 3.0), batch_size=batch_size, shuffle=True)


def private_fit(
    tmp_path: Path, module: L.LightningModule, callbacks: list[L.Callback], epochs: int, **privacy: Any
) -> PrivateTraining:
    private = PrivateTraining({**PRIVACY, **privacy}, PrivacyLedger(tmp_path / "accountant.pt"), 1, "client 0")
    loader = private.private_loader(regression_loader(), epochs)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, private],
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    return private


def test_accountant_sees_every_step_taken(tmp_path: Path) -> None:
    private = private_fit(tmp_path, Regression(), [], epochs=3)
    # 50 records, batch 8: q = 1/⌈50/8⌉ = 1/7, 7 Poisson batches per epoch.
    assert private.sample_rate == pytest.approx(1 / 7)
    assert private.steps_taken == private.planned_steps == 21
    assert private.round_history() == [(1.0, pytest.approx(1 / 7), 21)]
    epsilon = private.finish()
    assert epsilon == pytest.approx(compute_epsilon("rdp", [(1.0, 1 / 7, 21)], 1e-5))


def test_finish_refuses_when_steps_and_accounting_differ(tmp_path: Path) -> None:
    private = private_fit(tmp_path, Regression(), [], epochs=1)
    private.steps_taken += 1
    with pytest.raises(RuntimeError, match="accountant recorded 7 steps but the optimizer took 8"):
        private.finish()
    assert not (tmp_path / "accountant.pt").exists()


def test_a_step_is_bounded_by_the_clipping_norm(tmp_path: Path) -> None:
    """With C tiny and σ=0 (clipping only, no privacy) one step moves w by at most lr·C·B/E[B]."""
    module = Regression(lr=1.0)
    before = module.linear.weight.detach().clone()
    private = PrivateTraining(
        {**PRIVACY, "max_grad_norm": 1e-3, "noise_multiplier": 1e-9}, PrivacyLedger(tmp_path / "a.pt"), 1, "c"
    )
    loader = private.private_loader(regression_loader(), 1)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[private],
        accelerator="cpu",
    )
    trainer.fit(module, loader)
    assert float((module.linear.weight.detach() - before).norm()) < 1e-3 * 50 / 7


def test_fedprox_pull_under_dp_moves_weights_toward_the_global_ones(tmp_path: Path) -> None:
    global_state = {"linear.weight": torch.zeros(1, 3), "linear.bias": torch.zeros(1)}
    distances = {}
    for mu in (0.0, 5.0):
        callback = FederatedRoundCallback(global_state, proximal_mu=mu, proximal_pull=True)
        private_fit(tmp_path / str(mu), Regression(), [callback], epochs=10, noise_multiplier=0.3, max_grad_norm=5.0)
        distances[mu] = sum(float(v.norm() ** 2) for v in callback.local_state.values()) ** 0.5
    assert distances[5.0] < 0.5 * distances[0.0]


def test_post_step_pull_is_lr_mu_times_distance() -> None:
    module = Regression(lr=0.1)
    callback = FederatedRoundCallback({"linear.weight": torch.zeros(1, 3)}, proximal_mu=2.0, proximal_pull=True)
    callback.on_fit_start(None, module)  # type: ignore[arg-type]
    with torch.no_grad():
        module.linear.weight.copy_(torch.tensor([[1.0, 2.0, -2.0]]))
    module.linear.weight.grad = torch.zeros(1, 3)
    callback.on_before_optimizer_step(None, module, None)  # type: ignore[arg-type]
    torch.testing.assert_close(module.linear.weight.grad, torch.zeros(1, 3))  # no gradient term under DP

    trainer = SimpleNamespace(optimizers=[module.configure_optimizers()])
    callback.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    torch.testing.assert_close(module.linear.weight.detach(), torch.tensor([[0.8, 1.6, -1.6]]))  # w − 0.1·2·w


def test_batchnorm_is_rejected_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match=r"1 \(BatchNorm1d\): BatchNorm mixes the samples of a batch"):
        check_private_trainable(model)
    model[1].requires_grad_(False)  # frozen BatchNorm still mixes the batch and leaks running statistics
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        check_private_trainable(model)
    check_private_trainable(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4)))


def test_cxr_fused_model_with_dp_is_rejected() -> None:
    with pytest.raises(ConfigError, match="InfoNCE loss couples the samples of a batch"):
        load_config("cxr_demo", ["privacy.dp=true", "model.modality=fused"])
    assert load_config("cxr_demo", ["privacy.dp=true", "model.modality=image"]).privacy.dp


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("privacy.noise_multiplier=0", "privacy.noise_multiplier=0.0 must be positive"),
        ("privacy.accountant=gdp", "privacy.accountant='gdp' is not one of: rdp, prv"),
        ("privacy.max_epsilon=-1", "privacy.max_epsilon=-1.0 must be positive"),
        ("privacy.target_epsilon=0", "privacy.target_epsilon=0.0 must be positive"),
        ("privacy.target_epsilon=8 privacy.max_epsilon=4", "privacy.max_epsilon=4.0 is below privacy.target_epsilon"),
        ("privacy.target_epsilon=8 federation.mode=async", "target_epsilon needs the rounds a client trains in"),
        ("trainer.gradient_clip_val=1", "trainer.gradient_clip_val=1.0 has no effect under privacy.dp"),
    ],
)
def test_privacy_config_is_validated_naming_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["privacy.dp=true", *override.split()])


def test_target_epsilon_sets_one_sigma_that_ends_the_planned_rounds_at_the_target(tmp_path: Path) -> None:
    ledger_path = tmp_path / "accountant.pt"
    settings = {**PRIVACY, "noise_multiplier": 123.0, "target_epsilon": 4.0}  # σ is calibrated, not taken
    sigmas, epsilons = [], []
    for server_round in (1, 2, 3):
        private = PrivateTraining(settings, PrivacyLedger(ledger_path), server_round, "client 0", planned_rounds=3)
        loader = private.private_loader(regression_loader(), local_epochs=2)
        trainer = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[private],
            accelerator="cpu",
        )
        trainer.fit(Regression(), loader)
        sigmas.append(private.noise_multiplier)
        epsilons.append(private.finish())
    assert sigmas[0] == sigmas[1] == sigmas[2] != 123.0
    # Opacus' accountant over the three rounds (q = 1/7, 14 steps each) ends just below the target
    assert epsilons[-1] == pytest.approx(compute_epsilon("rdp", [(sigmas[0], 1 / 7, 42)], 1e-5))
    assert 0.98 * 4.0 <= epsilons[-1] <= 4.0 and epsilons == sorted(epsilons)
    # a fourth round (a re-run, say) would pass the target, which is also the budget
    extra = PrivateTraining(settings, PrivacyLedger(ledger_path), 4, "client 0", planned_rounds=3)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy.max_epsilon=4"):
        extra.private_loader(regression_loader(), local_epochs=2)


def test_a_client_plans_its_noise_for_the_rounds_that_sample_it(tmp_path: Path) -> None:
    cfg = load_config(
        "leukemia_demo",
        ["privacy.dp=true", "privacy.target_epsilon=8", "federation.rounds=12", "federation.clients_per_round=4"],
    )
    planned = [_private_training(cfg, tmp_path, pid, 1).planned_rounds for pid in range(10)]  # type: ignore[union-attr]
    sampled = [
        sum(pid in sample_clients(list(range(10)), 4, int(cfg.seed), r) for r in range(1, 13)) for pid in range(10)
    ]
    assert planned == sampled and sum(planned) == 12 * 4 and len(set(planned)) > 1


def test_bert_per_sample_gradients_are_exact_with_batch_shaped_ids() -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder(
        {"name": "bert_micro", "options": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}, 50
    )
    ids, mask = torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    weights = torch.randn(encoder.out_dim)
    expected = []
    for i in range(3):
        encoder.zero_grad()
        (encoder(ids[i : i + 1], mask[i : i + 1]) @ weights).sum().backward()
        expected.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    handles = batch_shaped_ids(encoder)
    engine = PrivacyEngine()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(ids), batch_size=3)
    hooks, _, _ = engine.make_private(
        module=encoder,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        wrap_model=False,
        poisson_sampling=False,
    )
    encoder.zero_grad()
    (encoder(ids, mask) @ weights).sum().backward()
    for name in ("model.embeddings.position_embeddings.weight", "model.embeddings.token_type_embeddings.weight"):
        grad_sample = dict(encoder.named_parameters())[name].grad_sample / 3  # loss_reduction=mean rescales by B
        for i in range(3):
            torch.testing.assert_close(grad_sample[i], expected[i][name], rtol=1e-4, atol=1e-6)
    hooks.cleanup()
    for handle in handles:
        handle.remove()
