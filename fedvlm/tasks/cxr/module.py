"""``ContrastiveVLM``: the FedVLM chest X-ray vision-language model (CLIP-style alignment).

An image tower (timm: ViT or ResNet) and a text tower (``transformers``: a BERT-family model)
are projected into a shared space and aligned with the symmetric InfoNCE loss of FedVLM's
Algorithm 2 (Radford et al. 2021): for a batch of ``B`` image–report pairs with L2-normalised
embeddings ``u_i`` (image) and ``v_j`` (text) and a learnable temperature ``τ``,

    s_ij = u_i · v_j / τ
    L_InfoNCE = ½ [ CE(s, diag) + CE(sᵀ, diag) ]
              = −1/(2B) Σ_i [ log softmax_j(s_ij)|_{j=i} + log softmax_j(s_ji)|_{j=i} ].

Optional unimodal losses (FedVLM Eq. 3) add a multi-label classification head on each tower:
``L = L_InfoNCE + λ_img · L_img + λ_txt · L_txt`` with masked BCE (unknown labels are skipped).

Zero-shot classification scores a label from a prompt pair: ``P(label) = softmax(s_pos, s_neg)[0]``
where ``s_pos``/``s_neg`` are the image's similarities to "There is X." and "No X.".

The module knows nothing about federation; fedvlm attaches Flower from the outside. Subclass it
to change the towers or the loss (``model.module_class``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fedvlm.models.adapters import adapt_encoders
from fedvlm.models.encoders import build_image_encoder, build_text_encoder
from fedvlm.models.optim import build_optimizer

Batch = Mapping[str, torch.Tensor]

MAX_LOGIT_SCALE = 100.0
"""CLIP's clamp on ``1/τ``: keeps the learnable temperature from collapsing."""


def info_nce(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of FedVLM's Algorithm 2 over L2-normalised ``[B, P]`` embeddings.

    Args:
        image_embeddings: ``u``, normalised image embeddings; row ``i`` pairs with text row ``i``.
        text_embeddings: ``v``, normalised text embeddings.
        logit_scale: ``1/τ`` (a scalar tensor).

    Example:
        >>> u = torch.eye(2)
        >>> round(float(info_nce(u, u, torch.tensor(1.0))), 4)  # log(1 + e^-1)
        0.3133
    """
    logits = logit_scale * image_embeddings @ text_embeddings.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """Multi-label BCE over the known entries of ``labels`` (``nan`` = unknown, skipped).

    The mean runs over the known entries; with ``per_sample`` over all ``B × C`` entries instead
    (unknown ones count zero), so a record's gradient does not depend on how many labels the other
    records of the batch have (needed for per-sample clipping under DP).
    """
    known = ~torch.isnan(labels)
    if per_sample:
        terms = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
        return (terms * known.to(terms.dtype)).sum() / labels.numel()
    if not known.any():
        return logits.sum() * 0.0  # keeps the graph (and DDP) consistent
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


class ContrastiveVLM(L.LightningModule):
    """Federated vision-language model for chest X-rays.

    Args:
        model: The ``model`` config section (``image_encoder``, ``text_encoder``, ``dropout``,
            ``adapter``).
        contrastive: The ``contrastive`` config section (``projection_dim``, ``temperature``,
            ``learn_temperature``, ``image_loss_weight``, ``text_loss_weight``).
        optim: The ``optim`` config section.
        label_names: Names of the label vector's entries.
        image_size: Input image side in pixels.
        vocab_size: Tokenizer vocabulary size (for a randomly initialised text tower).

    Batches are dicts with ``image`` ``[B,3,H,W]`` (normalised floats), ``input_ids`` and
    ``attention_mask`` ``[B,L]`` and ``labels`` ``[B,C]`` (1/0, ``nan`` unknown).
    Zero-shot prompts are set with :meth:`set_prompts` (token ids are not weights: they do not
    travel and are not in the checkpoint's state dict).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        contrastive: Mapping[str, Any],
        optim: Mapping[str, Any],
        label_names: Sequence[str],
        image_size: int = 64,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.label_names = tuple(label_names)
        self.learning_rate: float = float(optim["lr"])
        self.per_sample_loss = False
        """Set by DP training: label-head losses as sums of per-record terms over the batch size."""
        self.image_loss_weight = float(contrastive["image_loss_weight"])
        self.text_loss_weight = float(contrastive["text_loss_weight"])
        self.modality: str = model.get("modality", "fused")
        self.image_encoder = (
            build_image_encoder(model["image_encoder"], image_size) if self.modality != "text" else None
        )
        self.text_encoder = build_text_encoder(model["text_encoder"], vocab_size) if self.modality != "image" else None
        self.adapter_layers = adapt_encoders(model.get("adapter"), self.image_encoder, self.text_encoder)
        projection_dim = int(contrastive["projection_dim"])
        fused = self.modality == "fused"
        self.image_projection = (
            nn.Linear(self.image_encoder.out_dim, projection_dim, bias=False)
            if fused and self.image_encoder is not None
            else None
        )
        self.text_projection = (
            nn.Linear(self.text_encoder.out_dim, projection_dim, bias=False)
            if fused and self.text_encoder is not None
            else None
        )
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / float(contrastive["temperature"]))),
            requires_grad=bool(contrastive["learn_temperature"]) and fused,
        )
        self.dropout = nn.Dropout(float(model["dropout"]))
        num_labels = len(self.label_names)
        # Unimodal label heads: Eq. 3's optional terms in fused mode, the whole model otherwise
        # (the paper's image-only FedAvg-CNN and text-only baselines).
        self.image_label_head = (
            nn.Linear(self.image_encoder.out_dim, num_labels)
            if self.image_encoder is not None and (self.modality == "image" or self.image_loss_weight)
            else None
        )
        self.text_label_head = (
            nn.Linear(self.text_encoder.out_dim, num_labels)
            if self.text_encoder is not None and (self.modality == "text" or self.text_loss_weight)
            else None
        )
        if self.modality != "fused":
            self.image_loss_weight = self.text_loss_weight = 1.0
        self.register_buffer("prompt_input_ids", torch.zeros(0, 2, 1, 1, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_attention_mask", torch.zeros(0, 2, 1, 1, dtype=torch.long), persistent=False)

    # -- towers ---------------------------------------------------------------------------------

    def encoders(self) -> list[nn.Module]:
        """The backbones (frozen during the first federated rounds, or for good in adapter mode)."""
        return [enc for enc in (self.image_encoder, self.text_encoder) if enc is not None]

    def scale(self) -> torch.Tensor:
        """``1/τ``, clamped to :data:`MAX_LOGIT_SCALE`."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image tower output before projection ``[B, D_img]`` (used by linear probes)."""
        if self.image_encoder is None:
            raise RuntimeError("a text-only model (model.modality=text) has no image tower")
        return self.image_encoder(images)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text tower output before projection ``[B, D_txt]``."""
        if self.text_encoder is None:
            raise RuntimeError("an image-only model (model.modality=image) has no text tower")
        return self.text_encoder(input_ids, attention_mask)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, P]`` in the shared space (fused models only)."""
        assert self.image_projection is not None, "only model.modality=fused has a shared space"
        return F.normalize(self.image_projection(self.dropout(self.image_features(images))), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, P]`` in the shared space (fused models only)."""
        assert self.text_projection is not None, "only model.modality=fused has a shared space"
        return F.normalize(self.text_projection(self.dropout(self.text_features(input_ids, attention_mask))), dim=-1)

    def label_probabilities(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``P(label present)`` ``[B, C]`` (``probabilities``) and, for fused models, the
        normalised ``image_embeddings``/``text_embeddings``.

        Fused models classify zero-shot from the prompts; unimodal baselines use their label head.
        """
        if self.modality == "image":
            assert self.image_label_head is not None
            return {"probabilities": torch.sigmoid(self.image_label_head(self.image_features(batch["image"])))}
        if self.modality == "text":
            assert self.text_label_head is not None
            features = self.text_features(batch["input_ids"], batch["attention_mask"])
            return {"probabilities": torch.sigmoid(self.text_label_head(features))}
        image_embeddings, text_embeddings = self(batch)
        return {
            "probabilities": self.zero_shot_probabilities(image_embeddings),
            "image_embeddings": image_embeddings,
            "text_embeddings": text_embeddings,
        }

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of a batch of pairs."""
        return self.embed_images(batch["image"]), self.embed_texts(batch["input_ids"], batch["attention_mask"])

    # -- zero-shot ------------------------------------------------------------------------------

    def set_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Set the zero-shot prompts: token ids ``[C, 2, L]`` (one pair per label: ``[:, 0]``
        positive, ``[:, 1]`` negative) or ``[C, 2, M, L]`` (up to ``M`` phrasings per side, an
        ensemble; rows whose attention mask is all zero are absent phrasings).

        Raises:
            ValueError: If there is not one prompt set per label, or a side has no phrasing.
        """
        if input_ids.dim() == 3:
            input_ids, attention_mask = input_ids.unsqueeze(2), attention_mask.unsqueeze(2)
        if (
            input_ids.dim() != 4
            or input_ids.shape[:2] != (len(self.label_names), 2)
            or attention_mask.shape != input_ids.shape
        ):
            raise ValueError(
                f"prompts must be [num_labels={len(self.label_names)}, 2, (M,) L] token ids, "
                f"got {tuple(input_ids.shape)}"
            )
        if not attention_mask.any(dim=-1).any(dim=-1).all():
            raise ValueError("every label needs at least one positive and one negative prompt")
        self.prompt_input_ids = input_ids.to(self.device)
        self.prompt_attention_mask = attention_mask.to(self.device)

    def prompt_embeddings(self) -> torch.Tensor:
        """Normalised embeddings of the prompts ``[C, 2, P]``: for an ensemble, the normalised
        mean of its phrasings' embeddings (CLIP's prompt ensembling)."""
        if self.prompt_input_ids.numel() == 0:
            raise RuntimeError("no zero-shot prompts set: call set_prompts() first")
        present = self.prompt_attention_mask.any(dim=-1)  # [C, 2, M]
        embedded = self.embed_texts(self.prompt_input_ids[present], self.prompt_attention_mask[present])  # [N, P]
        phrasings = embedded.new_zeros(*present.shape, embedded.shape[-1])
        phrasings[present] = embedded
        return F.normalize(phrasings.sum(dim=2), dim=-1)

    def zero_shot_probabilities(
        self, image_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``P(label present)`` ``[B, C]`` from the image's similarity to each prompt pair."""
        prompts = self.prompt_embeddings() if prompt_embeddings is None else prompt_embeddings
        similarity = self.scale() * torch.einsum("bp,ckp->bck", image_embeddings, prompts)
        return similarity.softmax(dim=-1)[..., 0]

    # -- training -------------------------------------------------------------------------------

    def compute_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``L = L_InfoNCE + λ_img · L_img + λ_txt · L_txt`` (FedVLM Algorithm 2 and Eq. 3);
        a unimodal baseline's loss is its label head's masked BCE alone."""
        image_features = self.image_features(batch["image"]) if self.image_encoder is not None else None
        text_features = (
            self.text_features(batch["input_ids"], batch["attention_mask"]) if self.text_encoder is not None else None
        )
        losses: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if self.image_projection is not None and self.text_projection is not None:
            assert image_features is not None and text_features is not None
            image_embeddings = F.normalize(self.image_projection(self.dropout(image_features)), dim=-1)
            text_embeddings = F.normalize(self.text_projection(self.dropout(text_features)), dim=-1)
            losses["contrastive_loss"] = info_nce(
                self._gather(image_embeddings), self._gather(text_embeddings), self.scale()
            )
            loss = loss + losses["contrastive_loss"]
        if self.image_label_head is not None and image_features is not None:
            losses["image_loss"] = masked_bce(
                self.image_label_head(self.dropout(image_features)), batch["labels"], self.per_sample_loss
            )
            loss = loss + self.image_loss_weight * losses["image_loss"]
        if self.text_label_head is not None and text_features is not None:
            losses["text_loss"] = masked_bce(
                self.text_label_head(self.dropout(text_features)), batch["labels"], self.per_sample_loss
            )
            loss = loss + self.text_loss_weight * losses["text_loss"]
        losses["loss"] = loss
        return losses

    def _gather(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Under DDP, the embeddings of every device (with gradients), so negatives span the global batch."""
        if self._trainer is None or self.trainer.world_size == 1:
            return embeddings
        gathered = self.all_gather(embeddings, sync_grads=True)
        assert isinstance(gathered, torch.Tensor)
        return gathered.reshape(-1, embeddings.shape[-1])

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(batch)
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size)
        if self.modality == "fused":
            self.log("train/temperature", 1.0 / self.scale(), on_step=False, on_epoch=True, batch_size=batch_size)
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = self.compute_loss(batch)
        self.log("val/loss", losses["loss"], batch_size=batch["image"].shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.parameters(), self.hparams["optim"], self.learning_rate)
