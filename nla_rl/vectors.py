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


def check_norms(vectors: torch.Tensor, what: str, error: type[Exception] = InjectionError) -> None:
    """Raise ``error`` for rows whose fp32 squared norm overflows (|x| above ~1e19): the norm is
    inf, so normalising gives 0 and every score NaN. Activations of real models have norms of 1-1e4,
    so such rows are a scale or units mistake, not data to inject. Non-finite rows are left to
    the callers' own NaN/Inf check."""
    v = vectors.detach().float()
    finite = torch.isfinite(v).all(dim=-1)
    overflow = finite & ~torch.isfinite(v.pow(2).sum(dim=-1))
    if bool(overflow.any()):
        bad = overflow.nonzero().flatten().tolist()
        peak = float(v[bad[0]].abs().max())
        raise error(f"{what}: rows {bad[:10]} are too large for float32 (max |x| = {peak:.3g}: the "
                    f"squared norm overflows); activations have norms of 1-1e4, so check the "
                    f"vectors' scale or units")


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
    check_norms(vectors, what)
    zero = vectors.float().pow(2).sum(dim=-1) == 0
    if bool(zero.any()):
        bad = zero.nonzero().flatten().tolist()
        raise InjectionError(f"{what}: rows {bad[:10]} are all zeros and have no direction to inject")
    return vectors
