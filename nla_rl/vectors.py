"""Activation vectors: validation and normalisation *to* a target norm (never multiplication by it)."""

from __future__ import annotations

import torch

from nla_rl.errors import InjectionError

NORM_EPS = 1e-12


def normalize_to(v: torch.Tensor, scale: float, eps: float = NORM_EPS) -> torch.Tensor:
    """Rescale each row of ``v`` to L2 norm ``scale``, in fp32.

    ``n_s(v) = v · s / sqrt(Σ v² + ε)`` — ε sits inside the square root so that the backward pass
    stays finite at ``v = 0``. Returns fp32; callers cast to their compute dtype afterwards.
    """
    v32 = v.float()
    return v32 * (scale / torch.sqrt(v32.pow(2).sum(dim=-1, keepdim=True) + eps))


def check_vectors(vectors: torch.Tensor, d_model: int, *, what: str = "activation vectors") -> torch.Tensor:
    """Return ``vectors`` as a 2-D tensor [n, d_model]; raise on wrong shape, zero or non-finite rows.

    A 1-D vector of size ``d_model`` is accepted as one row. Zero vectors have no direction and
    non-finite ones would poison the weights, so both are refused rather than silently injected.
    """
    if not isinstance(vectors, torch.Tensor):
        raise InjectionError(f"{what} must be a torch.Tensor, found {type(vectors).__name__}")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[-1] != d_model:
        raise InjectionError(
            f"{what}: expected shape [n, {d_model}] (d_model of the model), found "
            f"{list(vectors.shape)}. Check that the vectors come from the same base model/layer."
        )
    finite = torch.isfinite(vectors).all(dim=-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise InjectionError(f"{what}: rows {bad[:10]} contain NaN or Inf; drop or fix them first")
    zero = vectors.float().pow(2).sum(dim=-1) == 0
    if bool(zero.any()):
        bad = zero.nonzero().flatten().tolist()
        raise InjectionError(f"{what}: rows {bad[:10]} are all zeros and have no direction to inject")
    return vectors
