"""Pure math of adaptive merging (AdaRank, AdaMerging): straight-through binary masks, the merged-weight GEMM with a
memory-lean closed-form backward, and the entropy objective. No I/O, no Ray, no model code.

ALGORITHMS.md §1 and §10: W = θ_o + (U ⊙ cᵀ) Vh with c = λ[owner] · b · s, b = STE(σ(L/τ_m) > 0.5).
"""

from __future__ import annotations

import torch
from torch import Tensor


def straight_through_mask(logits: Tensor, temperature: float) -> Tensor:
    """Hard 0/1 forward value 1[σ(L/τ) > 0.5]; backward as if it were σ(L/τ) (∂b/∂p := 1)."""
    p = torch.sigmoid(logits / temperature)
    return p + ((p > 0.5).to(p.dtype) - p).detach()


def initial_logits(initial_mask: Tensor, magnitude: float = 0.1) -> Tensor:
    """+magnitude for components kept at init, −magnitude otherwise: every mask starts right at the threshold."""
    return torch.where(initial_mask, magnitude, -magnitude).float()


class SpectralMerge(torch.autograd.Function):
    """W = origin + (U ⊙ coefᵀ) Vh, saving only U and Vh for backward.

    Plain autograd would also keep the m×R product U ⊙ coefᵀ; here ∂L/∂coef = diag(Uᵀ G Vhᵀ) is computed as the column
    sums of U ⊙ (G Vhᵀ): one GEMM and one elementwise product, no extra saved tensor.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, U: Tensor, Vh: Tensor, coef: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(U, Vh)
        return torch.addmm(origin, U * coef.to(U.dtype), Vh).to(origin.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        U, Vh = ctx.saved_tensors
        g = ((grad.to(Vh.dtype) @ Vh.T) * U).sum(0)
        return None, None, None, g.float()


def spectral_merge(origin: Tensor, U: Tensor, Vh: Tensor, coef: Tensor) -> Tensor:
    return SpectralMerge.apply(origin, U, Vh, coef)


def mean_entropy(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over the batch of −Σ_c softmax·log_softmax (over valid positions first, for sequence outputs)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    if entropy.dim() == 2:  # [B, L] token positions: mean over each sequence's valid positions
        mask = torch.ones_like(entropy) if valid is None else valid.to(entropy.dtype)
        entropy = (entropy * mask).sum(1) / mask.sum(1).clamp(min=1)
    return entropy.mean()
