from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedvlm.config import load_config
from fedvlm.errors import ConfigError
from fedvlm.federation.callback import set_frozen
from fedvlm.runs import load_checkpoint, save_checkpoint
from fedvlm.tasks.leukemia.module import LeukemiaModule

ENCODERS = ("image_encoder", "text_encoder")  # model.freeze_modules


def make_module(**model_overrides: object) -> LeukemiaModule:
    cfg = load_config("leukemia_demo", [f"model.{k}={v}" for k, v in model_overrides.items()])
    return LeukemiaModule(
        OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.optim), image_size=32, vocab_size=30
    )


def make_batch(batch_size: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "input_ids": torch.randint(5, 30, (batch_size, 10), generator=generator),
        "attention_mask": torch.ones(batch_size, 10, dtype=torch.long),
        "leukemia": torch.tensor([1, 1, 0, 1, 0, 0])[:batch_size],
        "stage": torch.tensor([0, 3, -1, -1, -1, -1])[:batch_size],  # the third positive has no known stage
    }


def test_loss_is_bce_plus_gamma_times_stage_ce_on_staged_positives_only() -> None:
    torch.manual_seed(0)
    module = make_module(stage_loss_weight=0.5)
    batch = make_batch()
    binary_logit = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.2, 0.0])
    stage_logits = torch.randn(6, 4)
    losses = module.compute_loss(binary_logit, stage_logits, batch)
    expected_bin = F.binary_cross_entropy_with_logits(binary_logit, batch["leukemia"].float())
    expected_stage = F.cross_entropy(stage_logits[:2], torch.tensor([0, 3]))
    torch.testing.assert_close(losses["binary_loss"], expected_bin)
    torch.testing.assert_close(losses["stage_loss"], expected_stage)
    torch.testing.assert_close(losses["loss"], expected_bin + 0.5 * expected_stage)


def test_stage_loss_is_zero_without_staged_positives_but_keeps_the_graph() -> None:
    module = make_module()
    batch = make_batch()
    batch["stage"] = torch.full((6,), -1)
    stage_logits = torch.randn(6, 4, requires_grad=True)
    losses = module.compute_loss(torch.zeros(6), stage_logits, batch)
    assert float(losses["stage_loss"].detach()) == 0.0
    losses["loss"].backward()
    assert stage_logits.grad is not None and float(stage_logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("modality", "has_image", "has_text"), [("fused", True, True), ("image", True, False), ("text", False, True)]
)
def test_modality_switches_build_only_the_needed_encoders(modality: str, has_image: bool, has_text: bool) -> None:
    module = make_module(modality=modality)
    assert (module.image_encoder is not None) == has_image
    assert (module.text_encoder is not None) == has_text
    binary_logit, stage_logits = module(make_batch())
    assert binary_logit.shape == (6,) and stage_logits.shape == (6, 4)


def test_image_only_model_ignores_the_report() -> None:
    module = make_module(modality="image").eval()
    batch = make_batch()
    other = dict(batch, input_ids=torch.randint(5, 30, (6, 10)))
    torch.testing.assert_close(module(batch)[0], module(other)[0])


def test_frozen_encoders_are_left_out_of_the_optimiser() -> None:
    module = make_module()
    set_frozen(module, ENCODERS, frozen=True)
    optimiser = module.configure_optimizers()
    optimised = {id(p) for group in optimiser.param_groups for p in group["params"]}
    encoder_params = {id(p) for enc in module.encoders() for p in enc.parameters()}
    assert optimised and not (optimised & encoder_params)
    assert id(module.binary_head.weight) in optimised and id(module.fusion.linear.weight) in optimised
    set_frozen(module, ENCODERS, frozen=False)
    assert encoder_params <= {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    torch.manual_seed(3)
    module = make_module(fusion="gated").eval()
    path = tmp_path / "best.ckpt"
    save_checkpoint(path, module.state_dict(), dict(module.hparams), {"completed_round": 7})
    loaded = LeukemiaModule.load_from_checkpoint(path).eval()
    batch = make_batch()
    for expected, actual in zip(module.predict_probabilities(batch), loaded.predict_probabilities(batch), strict=True):
        torch.testing.assert_close(actual, expected)
    assert load_checkpoint(path)["fedvlm"]["completed_round"] == 7


def test_modality_dropout_zeroes_one_modality_per_sample_only_in_training() -> None:
    module = make_module(modality_dropout=0.3)
    torch.manual_seed(0)
    image, text = torch.ones(4000, 5), torch.ones(4000, 7)
    dropped_image, dropped_text = module._drop_modalities([image, text])
    no_image = dropped_image.sum(-1) == 0
    no_text = dropped_text.sum(-1) == 0
    assert not (no_image & no_text).any()  # never both
    assert float(no_image.float().mean()) == pytest.approx(0.3, abs=0.03)
    assert float(no_text.float().mean()) == pytest.approx(0.3, abs=0.03)
    module.eval()
    batch = make_batch()
    torch.testing.assert_close(module(batch)[0], module(batch)[0])  # no randomness at evaluation


def test_modality_dropout_out_of_range_is_refused() -> None:
    from fedvlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.modality_dropout=0.7 must be in \[0, 0.5\]"):
        load_config("leukemia_demo", ["model.modality_dropout=0.7"])


def test_unimodal_heads_add_their_weighted_mean_loss_and_without_late_fusion_are_not_used_for_prediction() -> None:
    torch.manual_seed(0)
    module = make_module(unimodal_loss_weight=0.5, modality_dropout=0.0, dropout=0.0, late_fusion_weight=0)
    assert len(module.unimodal_heads) == 2
    module.eval()  # no dropout inside the encoders: the parts recombine exactly
    batch = make_batch()
    embeddings = module.encode(batch)
    fused = module.fuse(batch, embeddings)
    main = module.compute_loss(module.binary_head(fused).squeeze(-1), module.stage_head(fused), batch)["loss"]
    per_modality = []
    for head, embedding in zip(module.unimodal_heads, embeddings, strict=True):
        logits = head(embedding)
        per_modality.append(module.compute_loss(logits[:, 0], logits[:, 1:], batch)["loss"])
    expected = main + 0.5 * (per_modality[0] + per_modality[1]) / 2
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer attached
    torch.testing.assert_close(module.training_step(batch, 0), expected)
    before = module(batch)
    with torch.no_grad():
        for head in module.unimodal_heads:
            head.weight.add_(1.0)  # changing them leaves predictions alone
    after = module(batch)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    assert (
        len(make_module(unimodal_loss_weight=0.0, late_fusion_weight=0, fusion_gradient_scale=1.0).unimodal_heads) == 0
    )


def test_per_sample_loss_makes_each_records_gradient_independent_of_the_others() -> None:
    torch.manual_seed(0)
    module = make_module()
    module.per_sample_loss = True
    binary_logit = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.2, 0.0])
    stage_logits = torch.randn(6, 4, requires_grad=True)
    batch = make_batch()
    stage_loss = module.compute_loss(binary_logit, stage_logits, batch)["stage_loss"]
    # Σ over the staged positives (rows 0 and 1) divided by the batch size, not by their count
    expected = F.cross_entropy(stage_logits[:2], torch.tensor([0, 3]), reduction="sum") / 6
    torch.testing.assert_close(stage_loss, expected)
    (row_0_gradient,) = torch.autograd.grad(stage_loss, stage_logits)
    other = dict(batch, stage=torch.tensor([0, -1, -1, -1, -1, -1]))  # another record loses its stage
    (row_0_again,) = torch.autograd.grad(
        module.compute_loss(binary_logit, stage_logits, other)["stage_loss"], stage_logits
    )
    torch.testing.assert_close(row_0_again[0], row_0_gradient[0])  # record 0 is unaffected


def test_fusion_gradient_scale_blocks_only_the_fusion_paths_gradient_into_the_encoders() -> None:
    batch = make_batch()

    def encoder_grads(scale: float, with_unimodal: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        module = make_module(unimodal_loss_weight=1.0, modality_dropout=0.0, dropout=0.0, fusion_gradient_scale=scale)
        embeddings = module.encode(batch)
        fused = module.fuse(batch, embeddings)
        binary_logit, stage_logits = module.binary_head(fused).squeeze(-1), module.stage_head(fused)
        loss = module.compute_loss(binary_logit, stage_logits, batch)["loss"]
        if with_unimodal:
            loss = loss + module.unimodal_loss(embeddings, batch)
        loss.backward()
        grads = [p.grad.clone() for enc in module.encoders() for p in enc.parameters() if p.grad is not None]
        return stage_logits.detach(), grads

    joint_logits, joint = encoder_grads(1.0, with_unimodal=False)
    blocked_logits, blocked = encoder_grads(0.0, with_unimodal=False)
    torch.testing.assert_close(blocked_logits, joint_logits)  # the forward pass is unchanged
    assert any(g.abs().sum() > 0 for g in joint)
    assert all(g.abs().sum() == 0 for g in blocked)  # the fused loss no longer reaches the encoders
    _, half = encoder_grads(0.5, with_unimodal=False)
    for g_half, g_joint in zip(half, joint, strict=True):
        torch.testing.assert_close(g_half, 0.5 * g_joint)
    _, aux_only = encoder_grads(0.0, with_unimodal=True)
    assert any(g.abs().sum() > 0 for g in aux_only)  # the auxiliary heads still train them


def test_fusion_gradient_scale_zero_needs_auxiliary_heads() -> None:
    with pytest.raises(ConfigError, match="model.fusion_gradient_scale=0 leaves the encoders"):
        load_config("leukemia_demo", ["model.fusion_gradient_scale=0", "model.unimodal_loss_weight=0"])
    with pytest.raises(ConfigError, match=r"model.fusion_gradient_scale=1.5 must be in \[0, 1\]"):
        load_config("leukemia_demo", ["model.fusion_gradient_scale=1.5"])


def test_logit_adjusted_loss_adds_tau_times_the_log_prior_of_the_training_data() -> None:
    torch.manual_seed(0)
    module = make_module(logit_adjustment=0.5)
    batch = make_batch()
    # 3 negatives, 2 positives; stages 0 and 3 seen once each, add-one smoothed: (2, 1, 1, 2) / 6
    module.set_label_prior(num_negative=3, num_positive=2, stage_counts=[1, 0, 0, 1])
    binary_logit = torch.tensor([0.3, -1.0, 2.0, 0.1, -0.2, 0.0])
    stage_logits = torch.randn(6, 4)
    losses = module.compute_loss(binary_logit, stage_logits, batch)
    log_odds = torch.log(torch.tensor(3.0 / 4.0))  # (2 + 1) / (3 + 1)
    log_prior = torch.log(torch.tensor([2.0, 1.0, 1.0, 2.0]) / 6.0)
    expected_bin = F.binary_cross_entropy_with_logits(binary_logit + 0.5 * log_odds, batch["leukemia"].float())
    expected_stage = F.cross_entropy(stage_logits[:2] + 0.5 * log_prior, torch.tensor([0, 3]))
    torch.testing.assert_close(losses["binary_loss"], expected_bin)
    torch.testing.assert_close(losses["stage_loss"], expected_stage)
    # predictions use the raw logits: the prior only shapes training
    module.eval()
    plain = make_module()
    plain.load_state_dict(module.state_dict())
    plain.eval()
    for adjusted, raw in zip(module.predict_probabilities(batch), plain.predict_probabilities(batch), strict=True):
        torch.testing.assert_close(adjusted, raw)


def test_logit_adjustment_reads_the_prior_from_the_local_training_data() -> None:
    import lightning as L

    module = make_module(logit_adjustment=1.0)
    batch = make_batch()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    loader = torch.utils.data.DataLoader([batch, batch], batch_size=None)
    trainer.fit(module, loader)  # two batches: 6 negatives, 6 positives, stages (2, 0, 0, 2)
    torch.testing.assert_close(module.binary_log_odds, torch.tensor(0.0))
    torch.testing.assert_close(module.stage_log_prior, torch.log(torch.tensor([3.0, 1.0, 1.0, 3.0]) / 8.0))
    assert "stage_log_prior" not in module.state_dict()  # site-specific: never travels


def test_logit_adjustment_counts_a_bundle_without_loading_images_or_drawing_random_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning as L

    from fedvlm.data.prepared import BundleDataset, make_loader

    fetched: list[int] = []
    fetch = BundleDataset.__getitem__
    monkeypatch.setattr(BundleDataset, "__getitem__", lambda self, row: fetched.append(row) or fetch(self, row))

    def fit_one_step(logit_adjustment: float) -> LeukemiaModule:
        module = make_module(logit_adjustment=logit_adjustment)
        loader = make_loader(make_batch(), batch_size=3, shuffle=True, seed=7, augment="dihedral")
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, loader)
        return module

    module = fit_one_step(1.0)
    # 3 negatives, 3 positives, staged (1, 0, 0, 1): add-one smoothed
    torch.testing.assert_close(module.binary_log_odds, torch.tensor(0.0))
    torch.testing.assert_close(module.stage_log_prior, torch.log(torch.tensor([2.0, 1.0, 1.0, 2.0]) / 6.0))
    adjusted_order, fetched[:] = list(fetched), []
    fit_one_step(0.0)
    # only the one training batch was fetched, in the order an unadjusted run draws
    assert len(adjusted_order) == 3
    assert adjusted_order == fetched


def test_logit_adjustment_is_refused_under_dp_sgd() -> None:
    with pytest.raises(ConfigError, match="model.logit_adjustment=1.0 with privacy.dp"):
        load_config("leukemia_demo", ["model.logit_adjustment=1.0", "privacy.dp=true"])
    with pytest.raises(ConfigError, match="model.logit_adjustment=-1.0 must be >= 0"):
        load_config("leukemia_demo", ["model.logit_adjustment=-1"])


def test_late_fusion_is_a_product_of_the_fused_and_image_experts_and_leaves_the_loss_alone() -> None:
    torch.manual_seed(0)
    module = make_module(late_fusion_weight=0.5)
    fused_only = make_module(late_fusion_weight=0)
    fused_only.load_state_dict(module.state_dict())
    module.eval()
    fused_only.eval()
    batch = make_batch()
    with torch.no_grad():
        binary_logit, _ = module(batch)
        fused_binary, fused_stage = fused_only(batch)
        image_logits = module.unimodal_heads[0](module.encode(batch)[0])
    # detection: a sum of log-odds; stage: log p_fused + w · log p_image, renormalised by softmax
    torch.testing.assert_close(binary_logit, fused_binary + 0.5 * image_logits[:, 0])
    expected = torch.softmax(fused_stage.log_softmax(-1) + 0.5 * image_logits[:, 1:].log_softmax(-1), dim=-1)
    _, stage_prob = module.predict_probabilities(batch)
    torch.testing.assert_close(stage_prob, expected)
    torch.testing.assert_close(stage_prob.sum(-1), torch.ones(6))
    assert not torch.allclose(stage_prob, torch.softmax(fused_stage, -1))
    # training: each head keeps its own loss, whatever the prediction weight
    module.train()
    fused_only.train()
    torch.manual_seed(1)
    with_late_fusion = module.training_step(batch, 0)
    torch.manual_seed(1)
    without = fused_only.training_step(batch, 0)
    torch.testing.assert_close(with_late_fusion, without)


def test_late_fusion_needs_the_auxiliary_heads() -> None:
    with pytest.raises(ConfigError, match="model.late_fusion_weight=1.0 combines .* model.unimodal_loss_weight > 0"):
        load_config(
            "leukemia_demo",
            ["model.late_fusion_weight=1", "model.unimodal_loss_weight=0", "model.fusion_gradient_scale=1"],
        )
    load_config("leukemia_demo", ["model.late_fusion_weight=1", "model.modality=image"])  # fused models only
    cfg = load_config(
        "leukemia_demo",
        ["model.unimodal_loss_weight=0", "model.late_fusion_weight=0", "model.fusion_gradient_scale=1"],
    )
    model = {**OmegaConf.to_container(cfg.model), "late_fusion_weight": 1.0}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="needs the auxiliary heads"):
        LeukemiaModule(model, OmegaConf.to_container(cfg.optim), image_size=32, vocab_size=30)  # type: ignore[arg-type]
