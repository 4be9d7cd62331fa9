"""Losses a learner group trains with, chosen by name (adding one = adding one ``Loss`` entry).

Each loss turns a rank's share of a step's rows (a dict of columns) into a batch, says how many
units (tokens or rows) each micro-batch contributes to the step's mean, and returns the *summed*
loss of a micro-batch; the learner divides by the global count (all ranks, all micro-batches), so
the step's loss is the exact mean over the whole step. The formulas are in the docstrings of the
functions in :mod:`nla_rl.sft` and :func:`nla_rl.grpo.policy_loss`.

Statistics (``Loss.stats``, e.g. the GRPO clip fraction) are reduced the same way: each
micro-batch gives ``name -> (Σ weight·value, Σ weight)``; the learner adds them over micro-batches,
all-reduces the sums over ranks and divides once (:func:`stat_vector`, :func:`stat_means`), so a
step's statistic is the exact weighted mean however the step was split, never a mean of means.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from nla_rl.sft import (ar_sft_loss_parts, av_sft_loss, build_ar_sft_batch, build_av_sft_batch,
                        shuffled)


StatSums = dict[str, tuple[float, float]]  # name -> (Σ weight·value, Σ weight)


class MicroLoss(NamedTuple):
    """One micro-batch's share of a step."""

    loss_sum: torch.Tensor  # summed loss, with gradient
    count: int  # units (tokens or rows) in loss_sum
    stats: StatSums  # weighted sums of the loss's statistics (empty when it has none)


@dataclass(frozen=True)
class Loss:
    """``build(rank, rows) -> batch``; ``count(batch) -> int``;
    ``compute(rank, model, micro) -> MicroLoss``; ``stats``: the names ``compute`` may report
    (a fixed order, so every rank all-reduces the same vector)."""

    role: str
    build: Callable[[Any, dict], Any]
    count: Callable[[Any], int]
    compute: Callable[[Any, torch.nn.Module, Any], MicroLoss]
    stats: tuple[str, ...] = ()


def add_stats(total: StatSums, part: StatSums) -> StatSums:
    """``total + part`` name by name (sums and weights added)."""
    out = dict(total)
    for name, (value, weight) in part.items():
        old_value, old_weight = out.get(name, (0.0, 0.0))
        out[name] = (old_value + value, old_weight + weight)
    return out


def stat_vector(names: Sequence[str], sums: StatSums) -> list[float]:
    """``[Σwx_0, Σw_0, Σwx_1, Σw_1, …]`` in the order of ``names`` (absent: zeros), to all-reduce."""
    return [x for name in names for x in sums.get(name, (0.0, 0.0))]


def stat_means(names: Sequence[str], vector: Sequence[float]) -> dict[str, float]:
    """``Σwx / Σw`` per name from a (reduced) :func:`stat_vector`; names with ``Σw = 0`` (e.g. no
    reference KL when ``kl_beta = 0``, or no kept token) are left out rather than reported as 0."""
    return {name: float(vector[2 * i] / vector[2 * i + 1]) for i, name in enumerate(names)
            if vector[2 * i + 1] > 0}


def _vectors(rows: dict) -> torch.Tensor:
    """The rows' vectors as a tensor of its own (Ray hands numpy arrays over read-only)."""
    return torch.tensor(np.asarray(rows["vectors"]), dtype=torch.float32)


def _build_av(rank, rows: dict):
    spec = rank.spec.model
    return build_av_sft_batch(rank.tokenizer, list(rows["explanations"]), _vectors(rows),
                              marker=spec.marker, template=spec.av_template,
                              prefill=spec.av_prefill, depth_pct=spec.depth_pct)


def _build_av_shuffled(rank, rows: dict):
    """The real-vs-shuffled control: each explanation paired with another row's vector."""
    return shuffled(_build_av(rank, rows), seed=int(rows.get("shuffle_seed", 0)) + rank.rank)


def _build_ar(rank, rows: dict):
    return build_ar_sft_batch(rank.tokenizer, list(rows["explanations"]), _vectors(rows),
                              template=rank.spec.model.ar_template)


def _av_compute(rank, model, micro) -> MicroLoss:
    return MicroLoss(*av_sft_loss(model, micro, rank.spec.model.injection), {})


def _build_grpo(rank, rows: dict):
    """Rollouts → a :class:`nla_rl.rl_batch.PolicyBatch` carrying the step's loss settings."""
    from nla_rl.rl_batch import build_policy_batch

    spec = rank.spec.model
    pad = rank.tokenizer.pad_token_id if rank.tokenizer.pad_token_id is not None else 0
    batch = build_policy_batch(rows["prompts"], rows["completions"], _vectors(rows),
                               rows["advantages"], marker=spec.marker, pad_id=pad,
                               engine_logp=rows.get("engine_logp"), old_logp=rows.get("old_logp"),
                               ref_logp=rows.get("ref_logp"))
    batch.settings, batch.temperature = rows["settings"], float(rows["temperature"])
    return batch


def _grpo_compute(rank, model, micro) -> MicroLoss:
    from nla_rl.rl_batch import grpo_micro_loss

    out = grpo_micro_loss(model, micro, rank.spec.model.injection, micro.settings,
                          micro.temperature)
    return MicroLoss(out.loss_sum, out.normalizer, grpo_stat_sums(out.stats, len(micro)))


# Logged as train/av/<name>; token-weighted over kept response tokens unless said otherwise.
GRPO_STATS = ("clip_frac", "approx_kl", "kl", "is_ratio_mean", "is_capped_frac", "masked_frac")


def grpo_stat_sums(stats: dict[str, float], rollouts: int) -> StatSums:
    """Weighted sums of one micro-batch's :func:`nla_rl.grpo.policy_loss` statistics.

    Token-weighted (weight = kept response tokens ``n``): ``clip_frac`` (the PPO clip is active:
    ``A > 0, ρ > 1 + ε_high`` or ``A < 0, ρ < 1 - ε_low``), ``approx_kl`` (k3 KL(π‖π_old)),
    ``kl`` (the recipe's estimate of KL(π‖π_ref), only when reference log-probs were given),
    ``is_ratio_mean`` (mean truncated IS weight ``min(exp(old - engine), C)``) and
    ``is_capped_frac`` (weights at the cap ``C``). Rollout-weighted (weight = rollouts):
    ``masked_frac``, the rollouts dropped for a learner/engine log-prob mismatch.
    """
    tokens = stats["policy/tokens"]
    per_token = {"clip_frac": stats["policy/clip_frac_high"] + stats["policy/clip_frac_low"],
                 "approx_kl": stats["policy/approx_kl"],
                 "is_ratio_mean": stats["policy/is_weight_mean"],
                 "is_capped_frac": stats["policy/is_capped_frac"]}
    if "policy/ref_kl" in stats:
        per_token["kl"] = stats["policy/ref_kl"]
    sums = {name: (mean * tokens, tokens) for name, mean in per_token.items()}
    sums["masked_frac"] = (stats["policy/masked_rollouts"], float(rollouts))
    return sums


@functools.lru_cache(maxsize=4)
def _basis_on(path: str, device: str):
    """The reward basis at ``path`` on ``device``, read once per rank process."""
    from nla_rl.reward_basis import load_reward_basis

    return load_reward_basis(path).to(device)


@functools.lru_cache(maxsize=2)
def _contrast_on(path: str, weight: float, tau: float, device: str):
    """The contrast bank at ``path`` on ``device``, read once per rank process."""
    from nla_rl.sft import load_contrast_bank

    return load_contrast_bank(path, weight, tau).to(device)


def _ar_compute(rank, model, micro) -> MicroLoss:
    """:func:`nla_rl.sft.ar_sft_loss_parts`, reporting its fit term as ``fit_mse`` (the loss
    without ``ar_sft.loss_basis``'s term: ``train/ar/fve`` is computed from it)."""
    spec = rank.spec.model
    basis = _basis_on(spec.reward_basis, str(rank.device)) if spec.reward_basis else None
    term_basis = _basis_on(spec.loss_basis, str(rank.device)) if spec.loss_basis else None
    contrast = _contrast_on(spec.contrast_bank, spec.contrast_weight, spec.contrast_tau,
                            str(rank.device)) if spec.contrast_bank else None
    loss, rows, fit = ar_sft_loss_parts(model, micro, spec.mse_scale, basis,
                                        term_basis=term_basis, term_weight=spec.loss_basis_weight,
                                        contrast=contrast)
    return MicroLoss(loss, rows, {"fit_mse": (float(fit), float(rows))})


LOSSES: dict[str, Loss] = {
    "av_sft": Loss("av", _build_av, lambda b: b.num_target_tokens(), _av_compute),
    "av_sft_shuffled": Loss("av", _build_av_shuffled, lambda b: b.num_target_tokens(),
                            _av_compute),
    "ar_sft": Loss("ar", _build_ar, len, _ar_compute, ("fit_mse",)),
    # GRPO (nla_rl.grpo.policy_loss): PPO clip, KL to the reference, truncated IS.
    "grpo": Loss("av", _build_grpo, lambda b: b.num_loss_units(), _grpo_compute, GRPO_STATS),
}


def get_loss(name: str, role: str) -> Loss:
    """The registered loss ``name``, checked to belong to ``role``."""
    loss = LOSSES.get(name)
    if loss is None:
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(LOSSES)}")
    if loss.role != role:
        raise ValueError(f"loss {name!r} trains the {loss.role.upper()}, not the {role.upper()}")
    return loss


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                        vectors: torch.Tensor, *, marker, injection, pad_id: int,
                        device, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token ``log softmax(z / T)[c_t]`` of each completion (``z`` the logits given the prompt
    and ``c_<t``), with ``vectors[b]`` injected at the marker of ``prompts[b]`` (fp32); one 1-D
    tensor per row. ``T = temperature`` gives the post-temperature values sampling used.

    Rows are right-padded ``prompt + completion``; the logit at column ``t`` scores token ``t+1``.
    """
    from nla_rl.rl_batch import build_policy_batch, token_logprobs

    batch = build_policy_batch(prompts, completions, vectors, torch.zeros(len(prompts)),
                               marker=marker, pad_id=pad_id).to(device)
    logp = token_logprobs(model, batch, injection, temperature)
    return [logp[b][batch.response_mask[b]].cpu() for b in range(len(prompts))]
