"""Rewards for the AV: normalised MSE between the AR's prediction and the gold activation.

All functions are pure torch, compute in fp32 and work per row of [n, d] inputs.

``scale`` everywhere is the resolved ``mse_scale`` of the sidecar: both vectors are normalised *to*
that norm (``n_s``, :func:`nla_rl.vectors.normalize_to`) before comparing; ``None`` means raw
vectors (no normalisation), as ``mse_scale: null`` does in the sidecar. The default is
``s = sqrt(d_model)`` (:func:`mse_scale_for`), under which ``MSE = 2 (1 - cos)``: 0 perfect,
2 orthogonal, 4 opposite.

Zero vectors: ``n_s(0) = 0`` (ε sits inside the square root), so a zero prediction gives
``MSE = mean_d n_s(h)² = s² / d`` — exactly 1 at ``s = sqrt(d)``; everything stays finite, and so
does the backward pass at ``pred = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nla_rl.errors import ConfigError, NLAError, mismatch
from nla_rl.vectors import normalize_to

MSE_FLOOR = 1e-8


def check_pair(pred: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pred`` and ``gold`` as [n, d] tensors of the same shape (a 1-D vector is one row)."""
    for name, value in (("pred", pred), ("gold", gold)):
        if not isinstance(value, torch.Tensor):
            raise NLAError(f"{name} must be a torch.Tensor, found {type(value).__name__}")
    pred = pred.unsqueeze(0) if pred.dim() == 1 else pred
    gold = gold.unsqueeze(0) if gold.dim() == 1 else gold
    if pred.dim() != 2 or pred.shape != gold.shape:
        raise NLAError(mismatch("pred/gold shape", list(gold.shape), list(pred.shape),
                                "pred and gold must both be [n, d_model] with the same n and d_model"))
    return pred, gold


def check_negatives(pred: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``negatives`` as [n, m, d] matching ``pred`` [n, d], with m ≥ 1 (one row: [m, d] is accepted)."""
    if not isinstance(negatives, torch.Tensor):
        raise NLAError(f"negatives must be a torch.Tensor, found {type(negatives).__name__}")
    if negatives.dim() == 2 and pred.shape[0] == 1:
        negatives = negatives.unsqueeze(0)
    if negatives.dim() != 3 or negatives.shape[0] != pred.shape[0] or negatives.shape[2] != pred.shape[1]:
        raise NLAError(mismatch("negatives shape", f"[{pred.shape[0]}, m, {pred.shape[1]}]",
                                list(negatives.shape), "pass m hard negatives per row: [n, m, d_model]"))
    if negatives.shape[1] == 0:
        raise NLAError("negatives: found m = 0 negatives per row; pass at least one")
    return negatives


def _norm(v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return v.float() if scale is None else normalize_to(v, scale)


def _mse(a: torch.Tensor, b: torch.Tensor, scale: float | None) -> torch.Tensor:
    return (_norm(a, scale) - _norm(b, scale)).pow(2).mean(dim=-1)


def _candidate_mse(pred, gold, negatives, scale) -> torch.Tensor:
    """``MSE(ĥ_i, c_ik)`` for ``c_i = [h_i, h_neg_i1, …]`` → [n, 1 + m], in one reduction (a negative
    equal to the gold gets the bit-identical MSE)."""
    pred, gold = check_pair(pred, gold)
    negatives = check_negatives(pred, negatives)
    candidates = torch.cat([gold.unsqueeze(1).float(), negatives.float()], dim=1)
    return _mse(pred.unsqueeze(1), candidates, scale)


def mse_scale_for(d_model: int) -> float:
    """The default ``mse_scale``: ``sqrt(d_model)``, so that ``MSE = 2 (1 - cos)``."""
    return math.sqrt(d_model)


def normalized_mse(pred: torch.Tensor, gold: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Per-row ``MSE_i = mean_d (n_s(pred_i) - n_s(gold_i))²`` → [n] fp32.

    With ``s = sqrt(d)``: ``MSE = 2 (1 - cos(pred, gold))`` ∈ [0, 4]; ``scale=None``: raw MSE.
    """
    pred, gold = check_pair(pred, gold)
    return _mse(pred, gold, scale)


def reward_neg_mse(mse: torch.Tensor) -> torch.Tensor:
    """``r = -MSE`` (the default reward)."""
    return -mse


def reward_neg_log_mse(mse: torch.Tensor) -> torch.Tensor:
    """``r = -log(max(MSE, 1e-8))`` (NaN stays NaN, for :func:`apply_failures` to floor)."""
    return -torch.log(torch.clamp(mse, min=MSE_FLOOR))


REWARDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg_mse": reward_neg_mse,
    "neg_log_mse": reward_neg_log_mse,
}
# The reward of an orthogonal prediction (MSE = 2 at s = sqrt(d)): what a failed rollout gets.
_PENALTIES = {"neg_mse": -2.0, "neg_log_mse": -math.log(2.0)}


def failure_penalty(kind: str) -> float:
    """Orthogonal-equivalent penalty: ``-2.0`` for ``neg_mse``, ``-log 2`` for ``neg_log_mse``."""
    if kind not in _PENALTIES:
        raise ConfigError(mismatch("reward kind", sorted(_PENALTIES), kind, "choose a known reward kind"))
    return _PENALTIES[kind]


def apply_failures(rewards: torch.Tensor, failed_mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Rewards with failed rows (no extractable explanation, length cap…) set to the penalty.

    Non-finite rewards (NaN, ±Inf) are floored at the penalty too, so they never reach the weights.
    Returns a new tensor; ``rewards`` is not modified.
    """
    penalty = failure_penalty(kind)
    bad = ~torch.isfinite(rewards)
    if failed_mask is not None:
        failed_mask = torch.as_tensor(failed_mask, dtype=torch.bool, device=rewards.device)
        if failed_mask.shape != rewards.shape:
            raise NLAError(mismatch("failed_mask shape", list(rewards.shape), list(failed_mask.shape)))
        bad = bad | failed_mask
    return torch.where(bad, torch.full_like(rewards, penalty), rewards)


def contrastive_max(pred: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """Reward relative to the closest hard negative → [n].

    ``r_i = -MSE(ĥ_i, h_i) + min_j MSE(ĥ_i, h_neg_ij)``; at ``s = sqrt(d)`` this is
    ``2 (cos(ĥ_i, h_i) - max_j cos(ĥ_i, h_neg_ij))``. Positive iff the gold is closer than every
    negative.
    """
    mse = _candidate_mse(pred, gold, negatives, scale)
    return -mse[:, 0] + mse[:, 1:].min(dim=1).values


def contrastive_infonce(pred: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor,
                        scale: float | None, tau: float = 1.0) -> torch.Tensor:
    """InfoNCE reward → [n], always ≤ 0.

    ``r_i = log softmax_k(-MSE(ĥ_i, c_k) / τ)`` at ``k = gold`` over ``c ∈ {h_i} ∪ {h_neg_ij}``.
    It rises towards 0 as the negatives move away from the prediction.
    """
    if not tau > 0:
        raise ConfigError(mismatch("infonce tau", "> 0", tau))
    logits = -_candidate_mse(pred, gold, negatives, scale) / tau
    return torch.log_softmax(logits, dim=1)[:, 0]


CONTRASTIVE: dict[str, Callable[..., torch.Tensor]] = {
    "max": contrastive_max,
    "infonce": contrastive_infonce,
}


def combined_reward(base: torch.Tensor, contrastive: torch.Tensor, weight: float) -> torch.Tensor:
    """``r = r_base + λ · r_contrastive`` (λ = ``weight``; λ = 0 gives the plain reward).

    Apply :func:`apply_failures` to the *combined* reward, so failed rows get exactly the penalty.
    """
    if base.shape != contrastive.shape:
        raise NLAError(mismatch("contrastive reward shape", list(base.shape), list(contrastive.shape)))
    return base + weight * contrastive
