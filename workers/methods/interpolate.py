"""Merges that interpolate whole weights on a sphere or towards a centre (mergekit's slerp, nuslerp, karcher and
model_stock). Pure torch on one tensor at a time: no I/O, no Ray.

Each function returns the merged *weights* (not a delta); the registry subtracts the base. The semantics (thresholds,
normalisation, fallbacks) are mergekit 0.1.5's, restated here; every docstring names the rule it follows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SLERP_DOT_THRESHOLD = 0.9995  # mergekit: |cos| above this counts as colinear and falls back to lerp
SLERP_EPS = 1e-8  # mergekit: a vector whose norm is at most this is not normalised


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Spherical interpolation of two whole tensors (mergekit `slerp`): the angle comes from the flattened tensors,
    each normalised unless its norm is ≤ 1e-8; |cos| > 0.9995 falls back to (1−t)·v0 + t·v1. The interpolation
    weights sin((1−t)θ)/sin θ and sin(tθ)/sin θ apply to the *unnormalised* tensors, so norms are interpolated too."""
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    u0 = v0 / n0 if n0 > SLERP_EPS else v0
    u1 = v1 / n1 if n1 > SLERP_EPS else v1
    dot = float((u0 * u1).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool = False, flatten: bool = True) -> Tensor:
    """mergekit `nuslerp`: slerp over the whole flattened tensor (`flatten`, its default), else per row (vectors along
    the last dim) or, with `row_wise`, per column (along dim 0). Norms are clamped to ≥ 1e-7 before normalising; a
    row with |sin θ| < 1e-8 takes the lerp. Like `slerp`, the weights apply to the unnormalised vectors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    out = torch.where(sin.abs() < 1e-8, torch.lerp(v0, v1, t), spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


CHUNK = 1 << 16  # entries per float64 partial sum in `_dot`


def _dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ of two 1-D tensors, summed in float64 chunk by chunk: a float32 sum of 10⁷ products is off by ~5e-4,
    more than a fine-tune's whole change to a weight's norm."""
    return sum(float(torch.dot(x.double(), y.double())) for x, y in zip(a.split(CHUNK), b.split(CHUNK)))


def _norm(flat: Tensor) -> float:
    """‖x‖ as `_dot` sums it, each chunk converted once."""
    return math.sqrt(sum(float(torch.dot(x, x)) for x in (chunk.double() for chunk in flat.split(CHUNK))))


def karcher_mean(tensors: Tensor, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """mergekit `karcher` with its equal weights 1/N: the Riemannian mean of the unit directions times the mean norm.

    Directions of tensors with norm ≤ tol are left out (their zero norm still counts in the mean norm). Start: the
    normalised mean direction (the first direction if that mean is shorter than tol). Each step moves along the mean
    log map Σ a_i θ_i/sin θ_i (u_i − cos θ_i u) (tasks with θ_i < tol skipped) by its length; stop when it is < tol.
    Fine-tunes of one base point in nearly one direction (θ_i ~ 1e-3), where the arccos of a float32 cosine keeps
    almost no digits; so θ_i comes from the chord, 2 asin(‖u_i − u‖/2), and the step is the tangent part of
    Σ a_i θ_i/sin θ_i (u_i − u) — the same vector in exact arithmetic, without the radial rounding that otherwise keeps
    a float32 step of a 10⁷-entry tensor above `tol` forever. Norms and dot products are summed in float64 (`_dot`). One task at a
    time, and the directions are normalised in place: `tensors` is consumed, and no other [N, ...] tensor is made.
    """
    flat = tensors.reshape(len(tensors), -1)
    norms = torch.tensor([_norm(row) for row in flat], dtype=torch.float64, device=flat.device)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0])
    scale = norms.to(flat.dtype)[:, None]
    units = flat.div_(scale) if bool(valid.all()) else flat[valid] / scale[valid]  # `tensors` consumed
    u = units.mean(0)
    u = units[0].clone() if _norm(u) < tol else u.div_(_norm(u))
    diff, step = torch.empty_like(u), torch.empty_like(u)
    for _ in range(max_iter):
        step.zero_()
        for unit in units:
            chord = _norm(torch.sub(unit, u, out=diff))
            theta = 2.0 * math.asin(min(chord / 2.0, 1.0))
            if theta >= tol:
                step.add_(diff, alpha=theta / math.sin(theta) / len(units))
        step.sub_(u, alpha=_dot(step, u))  # the tangent part: the log map's own radial terms cancel exactly
        length = _norm(step)
        if length < tol:
            break
        u = u.mul(math.cos(length)).add_(step, alpha=math.sin(length) / length)
        u_norm = _norm(u)
        if u_norm > tol:
            u.div_(u_norm)
    return u.mul_(float(norms.mean())).reshape(tensors.shape[1:])


def model_stock(taus: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock as a delta, t · mean_t τ_t (mergekit `model_stock`): t = N cos θ / (1 + (N−1) cos θ), cos θ the
    mean over task pairs of the cosine between task vectors (norm product clamped to ≥ 1e-6, cosine to [−1, 1]) —
    of the whole flattened tensor, or per row (vectors along the last dim; a 1-D tensor is one row) with
    `filter_wise`. A mean cosine of −1/(N−1) divides by zero, as in mergekit."""
    n = len(taus)
    width = taus.shape[-1] if filter_wise and taus.dim() > 1 else -1
    rows = taus.reshape(n, 1, -1) if width == -1 else taus.reshape(n, -1, width)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cosines = [((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(cosines).mean(0)
    ratio = n * cos / (1 + (n - 1) * cos)
    return (ratio[:, None] * rows.mean(0)).reshape(taus.shape[1:])
