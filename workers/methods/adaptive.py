"""Pure math of adaptive merging (AdaRank, AdaMerging): straight-through binary masks, the merged-weight GEMM with a
memory-lean closed-form backward, and the entropy objective. No I/O, no Ray, no model code.

docs/METHODS.md §4: W = θ_o + (U ⊙ cᵀ) Vh with c = λ[owner] · b · s, b = STE(σ(L/τ_m) > 0.5).
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
        # fp32 product even for 16-bit factors (CPU has no 16-bit GEMM with an fp32 output): the merged weight is fp32
        return torch.addmm(origin.float(), U.float() * coef, Vh.float())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        U, Vh = ctx.saved_tensors
        g = ((grad.to(Vh.dtype) @ Vh.T) * U).sum(0)
        return None, None, None, g.float()


def spectral_merge(origin: Tensor, U: Tensor, Vh: Tensor, coef: Tensor) -> Tensor:
    return SpectralMerge.apply(origin, U, Vh, coef)


def masked_task_matrices(U: Tensor, s: Tensor, Vh: Tensor, owner: Tensor, hard: Tensor, rows: int) -> Tensor:
    """M_j = U_j diag(b_j ⊙ s_j) Vh_j for every λ row j: the masked task vectors (a pure function of the hard mask)."""
    out = torch.zeros((rows, U.shape[0], Vh.shape[1]), dtype=torch.float32, device=U.device)
    for j in range(rows):
        refresh_masked_matrix(out, j, U, s, Vh, owner, hard)
    return out


def refresh_masked_matrix(cache: Tensor, row: int, U: Tensor, s: Tensor, Vh: Tensor, owner: Tensor, hard: Tensor) -> None:
    """Recompute one row of the cache exactly (never by incremental updates, so it cannot drift and resumes bitwise)."""
    keep = (owner == row) & hard
    cache[row] = (U[:, keep].float() * s[keep]) @ Vh[keep].float() if bool(keep.any()) else 0.0


class MaskedTaskSum(torch.autograd.Function):
    """W = origin + Σ_j λ_j M_j over cached masked task vectors M_j (forward cost T·m·n instead of T·r·m·n).

    Backward: ∂L/∂λ_j = ⟨G, M_j⟩, and for the mask ∂L/∂b = λ[owner] · s ⊙ diag(Uᵀ G Vhᵀ) (only when masks learn).
    The cache must hold M_j for the current hard mask; the forward value does not depend on `b` itself.
    """

    @staticmethod
    def forward(ctx, origin: Tensor, lam: Tensor, b: Tensor, cache: Tensor, U: Tensor, s: Tensor, Vh: Tensor, owner: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(lam, cache, U, s, Vh, owner)
        return origin + torch.tensordot(lam, cache, dims=1)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        lam, cache, U, s, Vh, owner = ctx.saved_tensors
        grad_lam = torch.tensordot(cache, grad, dims=2) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            diag = ((grad.to(Vh.dtype) @ Vh.T) * U).sum(0).float()
            grad_b = lam[owner] * s * diag
        return None, grad_lam, grad_b, None, None, None, None, None


class TaskVectorSum(torch.autograd.Function):
    """W = origin + Σ_t λ_t τ_t over stored task vectors of any float dtype, summed in fp32 one task at a time.

    Backward ∂L/∂λ_t = ⟨G, τ_t⟩, again one task at a time: no [T, ...] fp32 temporary besides the stack itself, so
    16-bit stacks stay 16-bit (the difference of two nearby bf16 weights is exact in bf16, by Sterbenz' lemma).
    """

    @staticmethod
    def forward(ctx, origin: Tensor, lam: Tensor, taus: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(lam, taus)
        out = origin.to(torch.float32, copy=True)
        for t in range(taus.shape[0]):
            out.add_(taus[t].float(), alpha=float(lam[t]))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        lam, taus = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        g = grad.float()
        grad_lam = torch.stack([torch.vdot(taus[t].float().reshape(-1), g.reshape(-1)) for t in range(taus.shape[0])])
        return None, grad_lam.to(lam.dtype), None
