"""``LeukemiaModule``: the Fed-MMX dual-head model (leukemia yes/no + clinical stage).

A ViT image encoder and a BERT-family text encoder feed a fusion layer
(:mod:`fedvlm.models.fusion`) and two heads. The loss is ``L = L_bin + γ · L_stage`` where
``L_bin`` is binary cross-entropy on the detection logit and ``L_stage`` is cross-entropy of the
stage head **on positives with a known stage only** (a healthy smear has no stage).

The module knows nothing about federation: fedvlm attaches Flower from the outside through a
callback. Subclass it to change the architecture or the loss; ``fedvlm fit`` uses a subclass
named by ``model.module_class``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fedvlm.data.prepared import BundleDataset
from fedvlm.models.adapters import adapt_encoders
from fedvlm.models.encoders import build_image_encoder, build_text_encoder
from fedvlm.models.fusion import ConcatFusion, fusions
from fedvlm.models.optim import build_optimizer

Batch = Mapping[str, torch.Tensor]


class LeukemiaModule(L.LightningModule):
    """Multimodal leukemia detection and staging.

    Args:
        model: The ``model`` config section (encoders, ``modality``, ``fusion``, ``fusion_dim``,
            ``dropout``, ``num_stages``, ``stage_loss_weight``).
        optim: The ``optim`` config section (``name``, ``lr``, ``momentum``, ``weight_decay``).
        image_size: Input image side in pixels.
        vocab_size: Tokenizer vocabulary size (for a randomly initialised text encoder).

    Batches are dicts with ``image`` ``[B,3,H,W]`` (normalised floats), ``input_ids`` and
    ``attention_mask`` ``[B,L]``, ``leukemia`` ``[B]`` (0/1) and ``stage`` ``[B]`` (0-based,
    ``-1`` when negative or unknown).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        image_size: int = 64,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.modality: str = model["modality"]
        self.num_stages: int = int(model["num_stages"])
        self.stage_loss_weight: float = float(model["stage_loss_weight"])
        self.learning_rate: float = float(optim["lr"])
        self.modality_dropout: float = float(model.get("modality_dropout", 0.0))
        self.unimodal_loss_weight: float = float(model.get("unimodal_loss_weight", 0.0))
        self.fusion_gradient_scale: float = float(model.get("fusion_gradient_scale", 1.0))
        self.logit_adjustment: float = float(model.get("logit_adjustment", 0.0))
        self.late_fusion_weight: float = float(model.get("late_fusion_weight", 0.0))
        self.per_sample_loss = False
        """Set by DP training: every loss term a sum of per-record terms over the batch size."""
        self.image_encoder = (
            build_image_encoder(model["image_encoder"], image_size) if self.modality != "text" else None
        )
        self.text_encoder = build_text_encoder(model["text_encoder"], vocab_size) if self.modality != "image" else None
        self.adapter_layers = adapt_encoders(model.get("adapter"), self.image_encoder, self.text_encoder)
        in_dims = [enc.out_dim for enc in (self.image_encoder, self.text_encoder) if enc is not None]
        fusion_dim = int(model["fusion_dim"])
        self.fusion: nn.Module = (
            fusions.create(model["fusion"], in_dims, fusion_dim)
            if len(in_dims) == 2
            else ConcatFusion(in_dims, fusion_dim)
        )
        self.dropout = nn.Dropout(float(model["dropout"]))
        self.binary_head = nn.Linear(fusion_dim, 1)
        self.stage_head = nn.Linear(fusion_dim, self.num_stages)
        # Auxiliary heads on each encoder alone (only trained when unimodal_loss_weight > 0).
        self.unimodal_heads = nn.ModuleList(
            [nn.Linear(dim, 1 + self.num_stages) for dim in in_dims]
            if self.unimodal_loss_weight > 0 and len(in_dims) == 2
            else []
        )
        # log class priors of the training data (logit-adjusted loss); local, never sent
        self.register_buffer("stage_log_prior", torch.zeros(self.num_stages), persistent=False)
        self.register_buffer("binary_log_odds", torch.zeros(()), persistent=False)
        if self.late_fusion_weight > 0 and self.modality == "fused" and len(self.unimodal_heads) == 0:
            raise ValueError("late_fusion_weight > 0 needs the auxiliary heads: set unimodal_loss_weight > 0")

    def encoders(self) -> list[nn.Module]:
        """The pretrained-style backbones (frozen during the first federated rounds)."""
        return [enc for enc in (self.image_encoder, self.text_encoder) if enc is not None]

    def encode(self, batch: Batch) -> list[torch.Tensor]:
        """The per-modality embeddings ``[B, D_m]`` (image first), before fusion."""
        embeddings = []
        if self.image_encoder is not None:
            embeddings.append(self.image_encoder(batch["image"]))
        if self.text_encoder is not None:
            embeddings.append(self.text_encoder(batch["input_ids"], batch["attention_mask"]))
        return embeddings

    def fuse(self, batch: Batch, embeddings: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The fused patient representation ``[B, fusion_dim]`` (from ``embeddings`` when given)."""
        if embeddings is None:
            embeddings = self.encode(batch)
        if self.fusion_gradient_scale != 1.0 and len(embeddings) == 2:
            embeddings = [_scale_gradient(e, self.fusion_gradient_scale) for e in embeddings]
        if self.training and self.modality_dropout > 0 and len(embeddings) == 2:
            embeddings = self._drop_modalities(embeddings)
        return self.dropout(self.fusion(embeddings))

    def _drop_modalities(self, embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
        """Modality dropout: per sample, zero the image embedding with probability p, else the
        text embedding with probability p (never both).

        Without it the report, which decides the stage whenever it states the blast %, wins the
        joint training and the image branch stays weak exactly where it is needed: cases whose
        report omits the decisive values. Training on single-modality samples too makes each
        branch stand alone, as in Neverova et al. 2016 (ModDrop).
        """
        image_embedding, text_embedding = embeddings
        draw = torch.rand(image_embedding.shape[0], 1, device=image_embedding.device)
        keep_image = (draw >= self.modality_dropout).to(image_embedding.dtype)
        keep_text = ((draw < self.modality_dropout) | (draw >= 2 * self.modality_dropout)).to(text_embedding.dtype)
        return [image_embedding * keep_image, text_embedding * keep_text]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction: detection logit ``[B]`` and stage logits ``[B, K]``.

        With ``model.late_fusion_weight`` w > 0 the fused heads are combined with the image
        encoder's auxiliary head as a product of experts: detection ``z_fused + w · z_image`` (a
        sum of log-odds), stage ``log p_fused + w · log p_image``. The fused heads lean on the
        report, which decides the stage whenever it states the blast %, and under-use the image
        exactly where the report omits the values; the image head is the expert there. The
        training loss is unchanged (each head keeps its own loss), so the image head stays an
        independent expert.
        """
        embeddings = self.encode(batch)
        fused = self.fuse(batch, embeddings)
        binary_logit, stage_logits = self.binary_head(fused).squeeze(-1), self.stage_head(fused)
        if self.late_fusion_weight > 0 and len(self.unimodal_heads) > 0:
            image_binary, image_stage = self.unimodal_logits(0, embeddings[0])
            binary_logit = binary_logit + self.late_fusion_weight * image_binary
            stage_logits = stage_logits.log_softmax(-1) + self.late_fusion_weight * image_stage.log_softmax(-1)
        return binary_logit, stage_logits

    def unimodal_logits(self, index: int, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detection logit ``[B]`` and stage logits ``[B, K]`` of auxiliary head ``index`` (0 the
        image encoder's, 1 the text encoder's) on that encoder's embedding."""
        logits = self.unimodal_heads[index](embedding)
        return logits[:, 0], logits[:, 1:]

    def unimodal_loss(self, embeddings: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean over modalities of ``L_bin + γ · L_stage`` of each encoder's own auxiliary head.

        A deep-supervision term: the report decides the stage whenever it states the blast %,
        so in joint training the image branch gets little staging gradient and stays weak exactly
        where it is needed (reports that omit the values). A head that sees only the image
        embedding forces the image encoder to carry staging information on its own. With
        ``model.late_fusion_weight`` > 0 the image head is also an expert in the prediction
        (:meth:`forward`).
        """
        if len(embeddings) != len(self.unimodal_heads):
            raise ValueError(f"{len(embeddings)} embeddings for {len(self.unimodal_heads)} auxiliary heads")
        losses = [
            self.compute_loss(*self.unimodal_logits(index, self.dropout(embedding)), batch)["loss"]
            for index, embedding in enumerate(embeddings)
        ]
        return torch.stack(losses).mean()

    def set_label_prior(self, num_negative: int, num_positive: int, stage_counts: Sequence[int]) -> None:
        """Set the class priors of the training data for the logit-adjusted loss (add-one smoothed,
        so a class a site has never seen keeps a finite prior)."""
        if len(stage_counts) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stage counts, got {len(stage_counts)}")
        counts = torch.as_tensor(stage_counts, dtype=torch.float32, device=self.stage_head.weight.device) + 1.0
        self.stage_log_prior = (counts / counts.sum()).log()
        self.binary_log_odds = torch.tensor(math.log((num_positive + 1.0) / (num_negative + 1.0)), device=counts.device)

    def on_train_start(self) -> None:
        if self.logit_adjustment > 0:
            loader = self.trainer.train_dataloader
            assert loader is not None, "Lightning sets the train dataloader before on_train_start"
            # A bundle's labels are counted directly: iterating the loader would load every image
            # and draw from the shuffle and augmentation generators, changing the training order.
            dataset = getattr(loader, "dataset", None)
            batches = [dataset.tensors] if isinstance(dataset, BundleDataset) else loader
            self.set_label_prior(*count_labels(batches, self.num_stages))

    def compute_loss(
        self, binary_logit: torch.Tensor, stage_logits: torch.Tensor, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """``L = L_bin + γ · L_stage``; ``L_stage`` averages over positives with a known stage.

        With ``model.logit_adjustment`` τ > 0 both terms are logit-adjusted (Menon et al. 2021,
        "Long-tail learning via logit adjustment"; FedLC, Zhang et al. 2022, for label skew across
        clients): the loss sees ``logits + τ · log π`` with ``π`` the class prior of the data being
        trained on, while predictions use the raw logits. A client whose data are nearly all
        stage III then does not learn "stage III is likely" into the shared weights, and the
        prediction is the balanced-prior posterior that macro-F1 rewards.
        """
        if self.logit_adjustment > 0:
            binary_logit = binary_logit + self.logit_adjustment * self.binary_log_odds
            stage_logits = stage_logits + self.logit_adjustment * self.stage_log_prior
        binary_loss = F.binary_cross_entropy_with_logits(binary_logit, batch["leukemia"].float())
        staged = batch["stage"] >= 0
        if self.per_sample_loss:
            # Σ over staged positives / batch size: each record's gradient depends on that record
            # only (a mean over the staged subset divides by a count the other records set).
            per_record = F.cross_entropy(stage_logits, batch["stage"].clamp(min=0), reduction="none")
            stage_loss = (per_record * staged.to(per_record.dtype)).sum() / staged.numel()
        elif staged.any():
            stage_loss = F.cross_entropy(stage_logits[staged], batch["stage"][staged])
        else:
            stage_loss = stage_logits.sum() * 0.0  # keeps the graph (and DDP) consistent
        loss = binary_loss + self.stage_loss_weight * stage_loss
        return {"loss": loss, "binary_loss": binary_loss, "stage_loss": stage_loss}

    def predict_probabilities(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``P(leukemia)`` ``[B]`` and stage probabilities ``[B, K]``."""
        binary_logit, stage_logits = self(batch)
        return torch.sigmoid(binary_logit), torch.softmax(stage_logits, dim=-1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        embeddings = self.encode(batch)
        fused = self.fuse(batch, embeddings)
        losses = self.compute_loss(self.binary_head(fused).squeeze(-1), self.stage_head(fused), batch)
        loss = losses["loss"]
        batch_size = batch["leukemia"].shape[0]
        if len(self.unimodal_heads) > 0:
            unimodal = self.unimodal_loss(embeddings, batch)
            loss = loss + self.unimodal_loss_weight * unimodal
            self.log("train/unimodal_loss", unimodal, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/stage_loss", losses["stage_loss"], on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        leukemia_prob, stage_prob = self.predict_probabilities(batch)
        return {"leukemia_prob": leukemia_prob, "stage_prob": stage_prob}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), self.hparams["optim"], self.learning_rate)


def count_labels(batches: Iterable[Batch], num_stages: int) -> tuple[int, int, list[int]]:
    """Negatives, positives and per-stage counts (staged positives) over ``batches``.

    Example:
        >>> batch = {"leukemia": torch.tensor([0, 1, 1, 1]), "stage": torch.tensor([-1, 2, 2, -1])}
        >>> count_labels([batch], num_stages=4)
        (1, 3, [0, 0, 2, 0])
    """
    num_positive = num_total = 0
    stage_counts = torch.zeros(num_stages, dtype=torch.long)
    for batch in batches:
        num_positive += int(batch["leukemia"].sum())
        num_total += int(batch["leukemia"].numel())
        stages = batch["stage"][batch["stage"] >= 0].long()
        stage_counts += torch.bincount(stages, minlength=num_stages)[:num_stages]
    return num_total - num_positive, num_positive, stage_counts.tolist()


def _scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by ``scale`` (0 blocks it).

    With ``model.fusion_gradient_scale < 1`` the encoders learn mostly from their own auxiliary
    heads and the fusion layer learns to combine what they found: the modality that wins joint
    training (the report) can no longer drown the other's gradient — the modality-imbalance
    problem of multimodal training (Wang et al. 2020, "What Makes Training Multi-modal
    Classification Networks Hard?"; Peng et al. 2022, OGM-GE).

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> _scale_gradient(x, 0.25).sum().backward()
        >>> x.grad
        tensor([0.2500, 0.2500])
    """
    detached = tensor.detach()
    return detached + scale * (tensor - detached)
