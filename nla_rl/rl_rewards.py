"""The rewards of one RL step, assembled from the AR's predictions and the rollouts' metadata.

Per rollout ``i`` (``N = prompts × group_size`` of them, group-major unless ``group_ids`` say
otherwise):

    r_i = REWARDS[rl.reward](MSE(ĥ_i, h_i)) + λ · CONTRASTIVE[combine](ĥ_i, h_i, negatives_i)
          - c · max(0, n_i - b_g)

then ``r_i = penalty`` for every *failed* rollout: no extractable explanation (``ĥ_i`` is None),
stopped by the length cap (finish reason ``length``), aborted by the engine, or a non-finite reward.
``n_i`` counts tokens up to and including the first EOS (batched generation pads to the group's
longest rollout; untrimmed lengths would be equal within a group and cancel in the advantage), and
``b_g`` is ``max_new_tokens - length_penalty_margin``, or a seeded random budget per group.

Length-capped rollouts stay in the policy loss (``keep`` is True for them): masking them out
made the length run away in the published runs. Only aborted rollouts (no complete sample) get
``keep = False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nla_rl.errors import NLAError, mismatch
from nla_rl.grpo import dense_groups
from nla_rl.metrics import hard_negative_gap, top1_retrieval
from nla_rl.reward_basis import apply_basis
from nla_rl.rewards import (CONTRASTIVE, REWARDS, check_negatives, check_pair, combined_reward,
                            failure_penalty, normalized_mse)

FINISH_REASONS = ("stop", "length", "abort")  # vLLM's; the HF engine reports the same names
_SEED_STRIDE = 1_000_003  # seed·stride + step: distinct budget draws per (run seed, step)


@dataclass
class StepRewards:
    rewards: torch.Tensor  # [N] fp32, finite
    keep: torch.Tensor  # [N] bool: rollouts that belong in the policy loss
    failed: torch.Tensor  # [N] bool: rollouts that got the failure penalty
    lengths: torch.Tensor  # [N] int64: tokens up to and including the first EOS
    metrics: dict[str, float]


def resolve_penalty(rl) -> float:
    """``rl.failure_penalty``, or the orthogonal-equivalent of ``rl.reward`` when it is null."""
    return failure_penalty(rl.reward) if rl.failure_penalty is None else float(rl.failure_penalty)


def response_lengths(token_ids, eos_token_ids: int | Sequence[int],
                     pad_token_id: int | None = None) -> torch.Tensor:
    """Tokens per rollout up to and including the first EOS → [N] int64.

    ``token_ids``: a [N, T] tensor (padded) or a sequence of 1-D id sequences. Without an EOS the
    whole row counts, less the ``pad_token_id`` entries when a pad id is given.
    """
    eos = torch.as_tensor([eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids))
    if eos.numel() == 0:
        raise NLAError("eos_token_ids is empty; pass the tokenizer's EOS id(s)")
    rows = token_ids if isinstance(token_ids, torch.Tensor) else [torch.as_tensor(r, dtype=torch.long)
                                                                   for r in token_ids]
    lengths = []
    for row in rows:
        hits = torch.isin(row, eos.to(row.device)).nonzero()
        if hits.numel():
            lengths.append(int(hits[0, 0]) + 1)
        else:
            lengths.append(int((row != pad_token_id).sum()) if pad_token_id is not None else len(row))
    return torch.tensor(lengths, dtype=torch.long)


def length_thresholds(groups: torch.Tensor, rl, seed: int = 0, step: int = 0) -> torch.Tensor:
    """``b_g`` per rollout → [N] fp32: ``max_new_tokens - margin``, or with ``random_length_budget``
    an integer drawn uniformly from ``[length_budget_min, max_new_tokens - margin]`` per group by a
    generator seeded with ``seed · 1000003 + step`` (the same draw on every rank and on resume)."""
    high = rl.max_new_tokens - rl.length_penalty_margin
    if not rl.random_length_budget:
        return torch.full(groups.shape, float(high))
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + step)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    budgets = torch.randint(rl.length_budget_min, high + 1, (num_groups,), generator=generator)
    return budgets[groups].float()


def hinge_length_penalty(lengths: torch.Tensor, thresholds: torch.Tensor, coef: float) -> torch.Tensor:
    """``p_i = c · max(0, n_i - b_i)`` → [N] fp32 (subtracted from the reward)."""
    return coef * torch.clamp(lengths.float() - thresholds, min=0.0)


def _stack_predictions(predictions, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ĥ`` [N, d] fp32 (zeros where missing) and the mask of rollouts that have one."""
    if isinstance(predictions, torch.Tensor):
        pred, gold = check_pair(predictions, gold)
        return pred.float(), torch.ones(pred.shape[0], dtype=torch.bool)
    if len(predictions) != gold.shape[0]:
        raise NLAError(mismatch("number of predictions", gold.shape[0], len(predictions),
                                "pass one prediction (or None) per rollout"))
    extracted = torch.tensor([p is not None for p in predictions], dtype=torch.bool)
    rows = [torch.zeros(gold.shape[1]) if p is None else torch.as_tensor(p).float().reshape(-1).cpu()
            for p in predictions]
    pred = torch.stack(rows) if rows else torch.zeros(0, gold.shape[1])
    check_pair(pred, gold)
    return pred, extracted


def _finish_masks(finish_reasons: Sequence[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(length-capped, aborted) masks from the engine's finish reasons."""
    if len(finish_reasons) != n:
        raise NLAError(mismatch("number of finish reasons", n, len(finish_reasons)))
    unknown = sorted({r for r in finish_reasons if r not in FINISH_REASONS})
    if unknown:
        raise NLAError(mismatch("finish reasons", list(FINISH_REASONS), unknown,
                                "map the engine's finish reasons to stop/length/abort"))
    capped = torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool)
    aborted = torch.tensor([r == "abort" for r in finish_reasons], dtype=torch.bool)
    return capped, aborted


def _base_and_contrastive(pred, gold, hard_negatives, rl, negatives_cfg, scale):
    """``REWARDS[rl.reward](MSE)`` (+ λ · contrastive when negatives are enabled) and the MSE."""
    mse = normalized_mse(pred, gold, scale)
    reward = REWARDS[rl.reward](mse)
    if negatives_cfg is not None and negatives_cfg.enabled:
        if hard_negatives is None:
            raise NLAError("negatives.enabled is true but no hard negatives were passed; pass "
                           "hard_negatives [N, per_sample, d] or set negatives.enabled=false")
        combine = CONTRASTIVE[negatives_cfg.combine]
        extra = {"tau": negatives_cfg.temperature} if negatives_cfg.combine == "infonce" else {}
        contrastive = combine(pred, gold, hard_negatives.float(), scale, **extra)
        reward = combined_reward(reward, contrastive, negatives_cfg.weight)
    return reward, mse


def step_rewards(predictions, gold: torch.Tensor, token_ids, finish_reasons: Sequence[str], rl, *,
                 scale: float | None, eos_token_ids: int | Sequence[int],
                 negatives_cfg=None, hard_negatives: torch.Tensor | None = None,
                 group_ids: torch.Tensor | None = None, pad_token_id: int | None = None,
                 seed: int = 0, step: int = 0, basis=None) -> StepRewards:
    """Rewards, keep mask and ``reward/*`` metrics of one step (formula: module docstring).

    ``predictions``: the AR's ĥ per rollout, as [N, d] or a list with None where no explanation
    could be extracted; ``gold`` [N, d]; ``token_ids``: the rollouts' generated ids (padded [N, T]
    or a list); ``finish_reasons``: stop/length/abort per rollout; ``rl``: RLConfig;
    ``scale``: the sidecar's mse_scale (None = raw vectors); ``negatives_cfg``: NegativesConfig;
    ``hard_negatives`` [N, m, d] (also used for the gap/top-1 metrics when negatives are off);
    ``basis``: the reward basis (:mod:`nla_rl.reward_basis`): prediction, gold and negatives are
    compared as ``B(v)``, so the reward, MSE, gap and top-1 are all in that basis (None = raw).
    """
    gold = torch.as_tensor(gold).float().cpu()
    pred, extracted = _stack_predictions(predictions, gold)
    n = pred.shape[0]
    if hard_negatives is not None:
        hard_negatives = check_negatives(pred, torch.as_tensor(hard_negatives).float().cpu())
        hard_negatives = apply_basis(basis, hard_negatives)
    pred, gold = apply_basis(basis, pred), apply_basis(basis, gold)
    capped, aborted = _finish_masks(finish_reasons, n)
    lengths = response_lengths(token_ids, eos_token_ids, pad_token_id)
    if lengths.shape != (n,):
        raise NLAError(mismatch("number of token id rows", n, lengths.shape[0]))
    groups = dense_groups(n, group_ids, rl.group_size)
    reward, mse = _base_and_contrastive(pred, gold, hard_negatives, rl, negatives_cfg, scale)
    length_pen = hinge_length_penalty(lengths, length_thresholds(groups, rl, seed, step),
                                      rl.length_penalty_coef)
    reward = reward - length_pen
    nonfinite = ~torch.isfinite(reward)
    failed = ~extracted | capped | aborted | nonfinite
    reward = torch.where(failed, torch.full_like(reward, resolve_penalty(rl)), reward)
    metrics = _reward_metrics(reward, mse, pred, gold, hard_negatives, extracted, failed, capped,
                              nonfinite, lengths, length_pen)
    return StepRewards(reward, ~aborted, failed, lengths, metrics)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else math.nan


def _reward_metrics(reward, mse, pred, gold, hard_negatives, extracted, failed, capped, nonfinite,
                    lengths, length_pen) -> dict[str, float]:
    """``reward/*`` over all rollouts; mse, gap and top-1 over rollouts with a finite ĥ (NaN when
    there is none, or no negatives for gap/top-1)."""
    scored = extracted & torch.isfinite(pred).all(dim=1)
    gap = top1 = math.nan
    if hard_negatives is not None and bool(scored.any()):
        gap = hard_negative_gap(pred[scored], gold[scored], hard_negatives[scored])
        top1 = top1_retrieval(pred[scored], gold[scored], hard_negatives[scored])
    finite_mse = mse[scored & torch.isfinite(mse)]
    return {
        "reward/mean": _mean(reward),
        "reward/std": float(reward.std(unbiased=False)) if reward.numel() else math.nan,
        "reward/mse": _mean(finite_mse),
        "reward/failure_rate": _mean(failed),
        "reward/extraction_failure_rate": _mean(~extracted),
        "reward/length_capped_rate": _mean(capped),
        "reward/nonfinite_rate": _mean(nonfinite & extracted),
        "reward/length_penalty": _mean(length_pen),
        "reward/gap": gap,
        "reward/top1": top1,
        "rollout/mean_tokens": _mean(lengths),
    }
