"""Cross-modal fusion layers of Fed-MMX (Eqs. 18–20).

Both map a list of modality embeddings to one fused representation ``[B, out_dim]``:

* :class:`ConcatFusion` — Eq. 18: ``r = ReLU(LN(W [z_img ; z_txt] + b))``, Xavier-initialised.
  With a single input it is the unimodal baseline's projection (same equation, one block).
* :class:`GatedFusion` — Eqs. 19–20: ``z = W_z z_img``, ``h = W_h z_txt``,
  ``α = σ(W_g [z ; h] + b_g)`` and ``r = α ⊙ z + (1 − α) ⊙ h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedvlm.registry import Registry


class ConcatFusion(nn.Module):
    """Concatenation fusion, Eq. 18 of Fed-MMX: ``r = ReLU(LayerNorm(W [z; h] + b))``.

    Args:
        in_dims: Embedding width of each modality, in input order.
        out_dim: Width of the fused representation.

    Example:
        >>> fusion = ConcatFusion([3, 2], 4)
        >>> fusion([torch.zeros(5, 3), torch.zeros(5, 2)]).shape
        torch.Size([5, 4])
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(sum(in_dims), out_dim)
        self.norm = nn.LayerNorm(out_dim)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.norm(self.linear(torch.cat(list(embeddings), dim=-1))))


class GatedFusion(nn.Module):
    """Gated fusion, Eqs. 19–20 of Fed-MMX: ``r = α ⊙ z + (1 − α) ⊙ h``, ``α = σ(W_g[z; h] + b_g)``.

    ``z`` and ``h`` are the image and text embeddings projected to ``out_dim``; the gate is
    per feature, so the model can lean on the image for some features and on the report for
    others. The last computed gate is kept in ``last_gate`` for inspection.

    Args:
        in_dims: ``(image_dim, text_dim)``.
        out_dim: Width of ``z``, ``h`` and the fused representation.
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        if len(in_dims) != 2:
            raise ValueError(f"gated fusion needs exactly two modalities, got {len(in_dims)}")
        self.image_proj = nn.Linear(in_dims[0], out_dim)
        self.text_proj = nn.Linear(in_dims[1], out_dim)
        self.gate = nn.Linear(2 * out_dim, out_dim)
        for layer in (self.image_proj, self.text_proj, self.gate):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.last_gate: torch.Tensor | None = None

    def forward(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        image_embedding, text_embedding = embeddings
        z = self.image_proj(image_embedding)
        h = self.text_proj(text_embedding)
        alpha = torch.sigmoid(self.gate(torch.cat([z, h], dim=-1)))
        self.last_gate = alpha.detach()
        return alpha * z + (1.0 - alpha) * h


fusions: Registry[nn.Module] = Registry("fusion")
fusions.register("concat")(ConcatFusion)
fusions.register("gated")(GatedFusion)
