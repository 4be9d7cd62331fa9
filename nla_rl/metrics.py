"""Evaluation metrics of the round trip ``ĥ = AR(AV(h))``: cosine, FVE, hard-negative gap, top-1.

Inputs are [n, d] (negatives [n, m, d]); per-row metrics return fp32 tensors, aggregates Python
floats. ``scale`` has the meaning it has in :mod:`nla_rl.rewards` (normalise to that norm;
``None`` = raw). Zero vectors are handled finitely: a zero vector has cosine 0 with everything.

Report :func:`fve` (the paper's definition). :func:`fve_meannorm` is the older variant and only
exists under that name: it always reads ≥ :func:`fve` (see its docstring); never mix the two.
"""

from __future__ import annotations

import torch

from nla_rl.rewards import check_negatives, check_pair
from nla_rl.vectors import normalize_to


def _unit(v: torch.Tensor) -> torch.Tensor:
    return normalize_to(v, 1.0)


def _norm(v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return v.float() if scale is None else normalize_to(v, scale)


def cosine(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Per-row ``cos(ĥ_i, h_i)`` → [n] fp32 (0 where either vector is zero)."""
    pred, gold = check_pair(pred, gold)
    return (_unit(pred) * _unit(gold)).sum(dim=-1)


def _candidate_cosines(pred, gold, negatives) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(ĥ_i, h_i)`` [n] and ``max_j cos(ĥ_i, h_neg_ij)`` [n], computed in one reduction so that
    a negative equal to the gold gets bit-identical cosine (ties are detected exactly)."""
    pred, gold = check_pair(pred, gold)
    negatives = check_negatives(pred, negatives)
    candidates = torch.cat([gold.unsqueeze(1).float(), negatives.float()], dim=1)
    cos = (_unit(pred).unsqueeze(1) * _unit(candidates)).sum(dim=-1)  # [n, 1 + m]
    return cos[:, 0], cos[:, 1:].max(dim=1).values


def _fve_parts(pred, gold, scale):
    pred, gold = check_pair(pred, gold)
    n_pred, n_gold = _norm(pred, scale), _norm(gold, scale)
    mu = n_gold.mean(dim=0, keepdim=True)  # mean of the *normalised* golds
    error = (n_pred - n_gold).pow(2).sum(dim=-1).mean()
    return n_gold, mu, error


# Below this fraction of the golds' mean squared norm, a "variance" is rounding, not spread: fp32
# means and renormalisations leave ~(log2(n)·2⁻²³)² ≈ 1e-12 of it where the golds are identical.
NO_VARIANCE_REL = 1e-10


def _spread_or_nan(variance: torch.Tensor, n_gold: torch.Tensor) -> float:
    """``variance`` as a float, NaN when there is none to explain: one row, or every
    (normalised) gold the same vector. Decided by row count and a tolerance relative to the
    golds' scale, never by whether float rounding happened to leave an exact zero."""
    power = float(n_gold.pow(2).sum(dim=-1).mean())
    if n_gold.shape[0] < 2 or not float(variance) > NO_VARIANCE_REL * power:
        return float("nan")
    return float(variance)


def _ratio(error: torch.Tensor, variance: torch.Tensor, n_gold: torch.Tensor) -> float:
    """``1 - error / variance``, NaN when there is no variance (:func:`_spread_or_nan`)."""
    return float(1.0 - float(error) / _spread_or_nan(variance, n_gold))


def fve(pred: torch.Tensor, gold: torch.Tensor, scale: float | None,
        spread: float | None = None) -> float:
    """Fraction of variance explained, the paper's definition (report this one).

    ``μ = mean_i n_s(h_i)`` over the evaluation set;
    ``FVE = 1 - E_i ‖n_s(ĥ_i) - n_s(h_i)‖² / E_i ‖n_s(h_i) - μ‖²``.
    1 for a perfect prediction, 0 for predicting μ itself, < 0 for uninformative predictions.
    The scale cancels for any ``s > 0``. NaN when the golds have no variance (one row, or every
    normalised gold the same vector; see :data:`NO_VARIANCE_REL`).

    ``spread``: the denominator measured once on a larger set of golds (:func:`gold_spread`)
    instead of on ``gold``'s rows. A small batch's own spread is biased low, and so is its FVE
    (one RL step scores 8 activations): over batches of 8 eval rows the tiny run's AR-SFT
    averaged FVE 0.04 on their own spreads and 0.21, its FVE on all rows, on the split's.
    """
    n_gold, mu, error = _fve_parts(pred, gold, scale)
    if spread is not None:
        return fve_from_error(error, spread=spread)
    return _ratio(error, (n_gold - mu).pow(2).sum(dim=-1).mean(), n_gold)


def gold_spread(golds, scale: float | None) -> float:
    """``E_i ‖n_s(h_i) - μ‖²`` over ``golds`` [N, d]: the denominator of :func:`fve`, measured
    once on a population (an RL run's split) for FVEs of its small batches. NaN when the golds
    have no variance."""
    n_gold = _norm(torch.as_tensor(golds), scale)
    if n_gold.dim() != 2:
        raise ValueError(f"golds: expected a 2-D [n, d] tensor, found shape {list(n_gold.shape)}")
    variance = (n_gold - n_gold.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()
    return _spread_or_nan(variance, n_gold)


def fve_from_error(error: float, gold: torch.Tensor | None = None, scale: float | None = None,
                   *, spread: float | None = None) -> float:
    """:func:`fve` when only the error is known (e.g. a training loss):
    ``1 - error / spread`` with ``error = E_i ‖n_s(ĥ_i) - n_s(h_i)‖²`` and ``spread`` the golds'
    ``E_i ‖n_s(h_i) - μ‖²`` (:func:`gold_spread` of ``gold``), or the one given (measured once on
    a larger set: see :func:`fve`); NaN as in :func:`fve`."""
    if spread is None:
        if gold is None:
            raise ValueError("fve_from_error: give the golds or their spread")
        spread = gold_spread(gold, scale)
    return float(1.0 - float(error) / spread)  # a NaN spread (no variance) stays NaN


def fve_meannorm(pred: torch.Tensor, gold: torch.Tensor, scale: float | None) -> float:
    """The older FVE variant: the denominator is ``E_i ‖n_s(h_i) - n_s(μ)‖²`` (μ as in :func:`fve`).

    Since ``E‖x - c‖² = E‖x - μ‖² + ‖μ - c‖²``, this denominator exceeds the paper's by
    ``‖μ - n_s(μ)‖² = (s - ‖μ‖)² ≥ 0``, so ``fve_meannorm ≥ fve`` (equal only when every gold has
    the same direction). Kept for comparison with older numbers; do not report it as FVE.
    """
    n_gold, mu, error = _fve_parts(pred, gold, scale)
    mu_n = _norm(mu, scale)
    return _ratio(error, (n_gold - mu_n).pow(2).sum(dim=-1).mean(), n_gold)


def hard_negative_gap(pred: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor) -> float:
    """``gap = mean_i [cos(ĥ_i, h_i) - max_j cos(ĥ_i, h_neg_ij)]`` (> 0: gold closer than negatives)."""
    positive, hardest = _candidate_cosines(pred, gold, negatives)
    return float((positive - hardest).mean())


def top1_retrieval(pred: torch.Tensor, gold: torch.Tensor, negatives: torch.Tensor) -> float:
    """Fraction of rows whose gold is strictly the most cosine-similar to ``ĥ`` among {gold} ∪ negatives.

    Ties count as failures (a negative identical to the gold is never beaten).
    """
    positive, hardest = _candidate_cosines(pred, gold, negatives)
    return float((positive > hardest).float().mean())
