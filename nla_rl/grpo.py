"""GRPO maths of the RL stage: group advantages and the clipped policy loss with KL and IS.

Pure torch, no distributed code: a learner calls :func:`policy_loss` once per micro-batch, adds up
``loss_sum`` and divides by the step's global ``normalizer`` (summed over micro-batches and ranks,
or computed up front with :func:`loss_normalizer`), so the gradient is the same however the step is
split.

Log-probs are per response token, [B, T] (B rollouts, T positions), with a response ``mask``:

- ``logp``: the learner now (carries the gradient);
- ``old_logp``: the learner at rollout time (behaviour policy of the PPO ratio); ``None`` means
  ``logp.detach()`` (the first epoch over a batch);
- ``engine_logp``: the rollout engine's log-probs (after temperature), for truncated importance
  sampling between the engine that sampled and the learner; ``None`` = no correction;
- ``ref_logp``: the frozen reference policy, for the KL term (may be ``None`` when β = 0).

Masked positions may hold anything (padding, -inf): they are replaced before any arithmetic, so
they never produce NaN gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nla_rl.errors import ConfigError, NLAError, mismatch

ADV_EPS = 1e-6  # default ε of the GRPO denominator std + ε (rl.advantage_eps; TRL uses 1e-4)
ZERO_STD = 1e-8  # a group with std below this has no signal: its advantages are exactly 0
LOG_RATIO_CLAMP = 20.0  # |log ratio| and |Δ| are clamped here before exp (exp(20) ≈ 5e8)


# ------------------------------------------------------------------------------- advantages


def grpo_advantage(rewards: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   eps: float = ADV_EPS) -> torch.Tensor:
    """``A_i = (r_i - mean_g) / (std_g + ε)`` (GRPO; invariant to the reward's scale while
    ``std_g ≫ ε``: with ``std_g`` = 1e-3, ε = 1e-4 shrinks the advantages by 9%, ε = 1e-6 by
    0.1%)."""
    return (rewards - mean) / (std + eps)


def drgrpo_advantage(rewards: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     eps: float = ADV_EPS) -> torch.Tensor:
    """``A_i = r_i - mean_g`` (Dr.GRPO: no std division, so no per-group reweighting; ε unused)."""
    del std, eps
    return rewards - mean


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantage,
    "drgrpo": drgrpo_advantage,
}


class GroupAdvantages(NamedTuple):
    advantages: torch.Tensor  # same shape as the rewards given, fp32
    zero_variance_groups: int  # groups with std < 1e-8 (their advantages are 0)
    num_groups: int
    group_std_mean: float = 0.0  # mean over groups of the within-group reward std_g


def dense_groups(n: int, group_ids=None, group_size: int | None = None, *,
                 hint: str | None = None) -> torch.Tensor:
    """A dense group index [N] (0..groups-1) of ``n`` rollouts: ``group_ids`` (any labels, one per
    rollout) renumbered in sorted order, or, without ids, contiguous groups of ``group_size``."""
    if group_ids is None:
        if group_size is None or group_size <= 0 or n % group_size:
            raise NLAError(mismatch("rollouts per step", f"a multiple of group_size {group_size}",
                                    n, "pass group_ids when groups are not contiguous and full"))
        return torch.arange(n) // group_size
    group_ids = torch.as_tensor(group_ids)
    if group_ids.shape != (n,):
        raise NLAError(mismatch("group_ids shape", [n], list(group_ids.shape), hint or ""))
    return torch.unique(group_ids.cpu(), return_inverse=True)[1]


def _group_index(rewards: torch.Tensor, group_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat rewards [N] and a dense group index [N] from [P, G] rewards or flat rewards + ids."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise NLAError(mismatch("rewards shape", "[prompts, group_size] (or flat rewards with "
                                    "group_ids)", list(rewards.shape)))
        return rewards.reshape(-1), dense_groups(rewards.numel(), group_size=rewards.shape[1])
    if rewards.dim() != 1:
        group_ids = torch.as_tensor(group_ids)
        raise NLAError(mismatch("group_ids shape", list(rewards.shape), list(group_ids.shape),
                                "pass flat rewards [N] with one group id per reward"))
    return rewards, dense_groups(rewards.shape[0], group_ids,
                                 hint="pass flat rewards [N] with one group id per reward")


def compute_advantages(rewards: torch.Tensor, kind: str = "grpo",
                       group_ids: torch.Tensor | None = None,
                       eps: float = ADV_EPS) -> GroupAdvantages:
    """Per-sample advantages from per-group reward statistics.

    ``rewards`` is [P, G] (one row per prompt), or flat [N] with ``group_ids`` [N] (groups may then
    differ in size). ``mean_g`` and ``std_g`` are the group's mean and sample standard deviation
    (Bessel-corrected, as TRL and verl compute it); ``ADVANTAGES[kind](r, mean_g, std_g, eps)``
    gives the advantage (``eps`` is GRPO's ε, ``rl.advantage_eps``). A group with
    ``std_g < 1e-8`` (all rewards equal, or a single sample) carries no signal: its advantages are
    exactly 0 and it is counted in ``zero_variance_groups``. ``group_std_mean`` is the mean of
    ``std_g`` over groups (logged as ``reward/group_std``, to compare with ε).
    """
    if kind not in ADVANTAGES:
        raise ConfigError(mismatch("advantage kind", sorted(ADVANTAGES), kind))
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"advantage eps: expected a finite number > 0, found {eps!r}")
    if not isinstance(rewards, torch.Tensor):
        raise NLAError(f"rewards must be a torch.Tensor, found {type(rewards).__name__}")
    if not bool(torch.isfinite(rewards).all()):
        raise NLAError("rewards contain NaN or Inf; floor them at the failure penalty first "
                       "(nla_rl.rl_rewards.step_rewards does)")
    # float64 statistics: a group whose rewards differ in the 4th digit loses its advantages'
    # zero sum to cancellation in float32 (r - mean with |r| ≫ r - mean).
    flat, index = _group_index(rewards.double(), group_ids)
    index = index.to(flat.device)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    counts = torch.zeros(num_groups, dtype=flat.dtype, device=flat.device).index_add_(0, index, torch.ones_like(flat))
    mean = torch.zeros(num_groups, dtype=flat.dtype, device=flat.device).index_add_(0, index, flat) / counts
    sq_dev = (flat - mean[index]).pow(2)
    var = torch.zeros(num_groups, dtype=flat.dtype, device=flat.device).index_add_(0, index, sq_dev)
    std = torch.sqrt(var / (counts - 1).clamp(min=1))
    flat_zero = (std < ZERO_STD) | (counts < 2)
    advantages = ADVANTAGES[kind](flat, mean[index], std[index], eps)
    advantages = torch.where(flat_zero[index], torch.zeros_like(advantages), advantages)
    return GroupAdvantages(advantages.reshape(rewards.shape).float(), int(flat_zero.sum()),
                           num_groups, float(std.mean()) if num_groups else 0.0)


# --------------------------------------------------------------------------- policy losses


def ppo_clip(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
             clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate (to minimise), pessimistic over the two branches.

    ``ρ = exp(logp - old_logp)``;
    ``L = max(-A·ρ, -A·clip(ρ, 1 - ε_low, 1 + ε_high))``.
    The clipped branch wins (zero gradient) when ``A > 0, ρ > 1 + ε_high`` or
    ``A < 0, ρ < 1 - ε_low``; those two masks are returned as (clipped_high, clipped_low).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    with torch.no_grad():
        clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
        clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
    return torch.maximum(unclipped, clipped), clipped_high, clipped_low


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "ppo_clip": ppo_clip,
}


def kl_k1(delta: torch.Tensor) -> torch.Tensor:
    """``k1 = -Δ = logπ - logπ_ref`` (unbiased KL(π‖π_ref) estimate; can be negative)."""
    return -delta


def kl_k3(delta: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(Δ) - Δ - 1`` with ``Δ = logπ_ref - logπ`` (unbiased, always ≥ 0)."""
    return torch.exp(delta) - delta - 1.0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k3": kl_k3}


# ----------------------------------------------------------------------------- aggregation


# Each takes the per-token losses [B, T], the kept-token mask [B, T] and the completion cap L_max
# (only the constant normaliser uses it) and returns (loss_sum, normaliser).


def agg_token_mean(per_token: torch.Tensor, mask: torch.Tensor,
                   max_len: int | None = None) -> tuple[torch.Tensor, int]:
    """``Σ_{b,t} m·L`` and its normaliser ``Σ m`` (the step's loss is Σ sums / Σ normalisers)."""
    del max_len
    return (per_token * mask).sum(), int(mask.sum())


def agg_seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor,
                            max_len: int | None = None) -> tuple[torch.Tensor, int]:
    """``Σ_b (Σ_t m·L / Σ_t m)`` over rollouts with ≥ 1 token, and their number as normaliser.

    A rollout with no kept token (an empty completion, or one masked for a log-prob mismatch)
    leaves the denominator too (TRL counts every row; nla-rl averages over rollouts that have a
    loss)."""
    del max_len
    tokens = mask.sum(dim=1)
    per_seq = (per_token * mask).sum(dim=1) / tokens.clamp(min=1)
    return per_seq.sum(), int((tokens > 0).sum())


def agg_seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor,
                                max_len: int | None = None) -> tuple[torch.Tensor, int]:
    """Dr.GRPO: ``Σ_{b,t} m·L`` over a constant normaliser ``B · L_max`` (B = every rollout row
    given to the loss, including rows masked for a log-prob mismatch or with an empty completion;
    L_max = ``rl.max_new_tokens``), as in the Dr.GRPO paper and TRL's
    ``loss_type="dr_grpo"``: no per-rollout length normalisation, so long and short completions
    get the same per-token weight and the loss scale does not depend on the batch's lengths."""
    if max_len is None or max_len <= 0:
        raise ConfigError("loss_agg seq_mean_token_sum_norm needs the completion cap L_max "
                          "(PolicyLossSettings.max_completion_tokens = rl.max_new_tokens)")
    return (per_token * mask).sum(), int(mask.shape[0]) * int(max_len)


AGGREGATIONS: dict[str, Callable[..., tuple[torch.Tensor, int]]] = {
    "token_mean": agg_token_mean,
    "seq_mean_token_mean": agg_seq_mean_token_mean,
    "seq_mean_token_sum_norm": agg_seq_mean_token_sum_norm,
}


@dataclass(frozen=True)
class PolicyLossSettings:
    """The knobs of :func:`policy_loss`; :meth:`from_rl` reads them from the recipe's ``rl``."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    is_cap: float = 2.0
    mismatch_threshold: float | None = 0.1
    loss_agg: str = "token_mean"
    kind: str = "ppo_clip"
    max_completion_tokens: int | None = None  # L_max of seq_mean_token_sum_norm (Dr.GRPO)

    def __post_init__(self):
        for name, value, registry in (("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
                                      ("loss_agg", self.loss_agg, AGGREGATIONS),
                                      ("kind", self.kind, POLICY_LOSSES)):
            if value not in registry:
                raise ConfigError(mismatch(f"policy loss {name}", sorted(registry), value))
        if not (0 < self.clip_low < 1 and self.clip_high > 0 and self.is_cap > 0
                and self.kl_beta >= 0):
            raise ConfigError(f"policy loss settings out of range: need 0 < clip_low < 1, "
                              f"clip_high > 0, is_cap > 0, kl_beta >= 0; found {self}")
        if self.loss_agg == "seq_mean_token_sum_norm" and not (
                isinstance(self.max_completion_tokens, int) and self.max_completion_tokens > 0):
            raise ConfigError(f"policy loss loss_agg seq_mean_token_sum_norm (Dr.GRPO) divides by "
                              f"rollouts x max_completion_tokens: set max_completion_tokens to "
                              f"rl.max_new_tokens (> 0), found {self.max_completion_tokens!r}")

    @classmethod
    def from_rl(cls, rl) -> "PolicyLossSettings":
        """From an :class:`nla_rl.config.RLConfig`."""
        return cls(clip_low=rl.clip_low, clip_high=rl.clip_high, kl_beta=rl.kl_beta,
                   kl_estimator=rl.kl_estimator, is_cap=rl.is_cap,
                   mismatch_threshold=rl.is_mismatch_threshold, loss_agg=rl.loss_agg,
                   max_completion_tokens=rl.max_new_tokens)


@dataclass
class PolicyLoss:
    loss_sum: torch.Tensor  # scalar with gradient: Σ of the aggregated per-token losses
    normalizer: int  # kept tokens (token_mean), kept rollouts (seq_mean_token_mean) or
    #                  rollouts x max_completion_tokens (seq_mean_token_sum_norm)
    token_count: int  # response tokens kept (after mismatch masking)
    stats: dict[str, float]

    @property
    def loss(self) -> torch.Tensor:
        """``loss_sum / normalizer``: the loss when this micro-batch is the whole step."""
        return self.loss_sum / max(self.normalizer, 1)


# ------------------------------------------------------------------ engine/learner mismatch


def rollout_logp_mismatch(learner_logp: torch.Tensor, engine_logp: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Per rollout ``mean_t |logp_learner - logp_engine|`` over its response tokens → [B] fp32.

    ``inf`` where a response token has a non-finite log-prob on either side; 0 for an empty
    response. A large value means the engine sampled from another distribution than the learner
    scores (a lost injection, stale weights, a different temperature).
    """
    mask = mask.bool()
    diff = (learner_logp.detach().float() - engine_logp.detach().float()).abs()
    finite = torch.isfinite(diff)
    summed = torch.where(mask & finite, diff, torch.zeros_like(diff)).sum(dim=1)
    mean = summed / mask.sum(dim=1).clamp(min=1)
    return torch.where((mask & ~finite).any(dim=1), torch.full_like(mean, float("inf")), mean)


def kept_rollouts(mask: torch.Tensor, old_logp: torch.Tensor | None,
                  engine_logp: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """[B] bool: rollouts the loss keeps. Dropped: a non-finite log-prob on a response token, or
    ``rollout_logp_mismatch > threshold`` (``threshold=None``: only the non-finite ones)."""
    keep = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    if engine_logp is None:
        return keep
    if old_logp is None:
        raise NLAError("old_logp is needed with engine_logp: the learner's log-probs at rollout "
                       "time are what the engine's are compared with")
    distance = rollout_logp_mismatch(old_logp, engine_logp, mask)
    keep = torch.isfinite(distance)
    return keep if threshold is None else keep & (distance <= threshold)


def loss_normalizer(mask: torch.Tensor, settings: PolicyLossSettings,
                    old_logp: torch.Tensor | None = None,
                    engine_logp: torch.Tensor | None = None) -> int:
    """The ``normalizer`` :func:`policy_loss` will return for this micro-batch, computed before any
    forward pass: sum it over micro-batches and ranks to divide each ``loss_sum`` by the step's
    global count before ``backward``."""
    mask = mask.bool() & kept_rollouts(mask.bool(), old_logp, engine_logp,
                                       settings.mismatch_threshold)[:, None]
    return AGGREGATIONS[settings.loss_agg](torch.zeros(mask.shape), mask.float(),
                                           settings.max_completion_tokens)[1]


# ------------------------------------------------------------------------------ the loss


def _check_loss_inputs(logp, advantages, mask, others: dict) -> torch.Tensor:
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise NLAError(f"logp must be a [rollouts, tokens] tensor, found "
                       f"{getattr(logp, 'shape', type(logp).__name__)}")
    for name, value in {"mask": mask, **others}.items():
        if value is not None and tuple(value.shape) != tuple(logp.shape):
            raise NLAError(mismatch(f"{name} shape", list(logp.shape), list(value.shape),
                                    "every per-token input must be [rollouts, tokens] like logp"))
    if tuple(advantages.shape) != (logp.shape[0],):
        raise NLAError(mismatch("advantages shape", [logp.shape[0]], list(advantages.shape),
                                "pass one advantage per rollout"))
    if not bool(torch.isfinite(advantages).all()):
        raise NLAError("advantages contain NaN or Inf; check the rewards (floor non-finite ones)")
    return mask.bool()


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 with masked-out positions set to 0 (padding may hold -inf or NaN)."""
    return torch.where(mask, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))


def _is_weights(old: torch.Tensor, engine_logp, mask, cap: float) -> torch.Tensor:
    """``w = min(exp(old_logp - engine_logp), C)``, detached (exp of the min: no overflow)."""
    if engine_logp is None:
        return torch.ones_like(old)
    log_w = (old - _masked(engine_logp.detach(), mask)).clamp(max=math.log(cap))
    return torch.exp(log_w)


def policy_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: PolicyLossSettings, *, old_logp: torch.Tensor | None = None,
                engine_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None) -> PolicyLoss:
    """The GRPO policy loss of one micro-batch (sum and normaliser; see the module docstring).

    Per kept response token, with ``ρ = exp(logp - old_logp)`` and ``Δ = ref_logp - logp``:
    ``L_t = w_t · max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high)) + β · KL(Δ)``,
    ``w_t = min(exp(old_logp - engine_logp), C)`` detached (truncated importance sampling,
    1 without ``engine_logp``), KL = k1 ``-Δ`` or k3 ``exp(Δ) - Δ - 1`` (skipped when β = 0).
    Rollouts dropped by :func:`kept_rollouts` contribute nothing and are not counted.
    ``loss_agg`` token_mean: ``loss_sum = Σ_{b,t} L``, ``normalizer`` = kept tokens;
    seq_mean_token_mean: ``loss_sum = Σ_b mean_t L``, ``normalizer`` = kept rollouts;
    seq_mean_token_sum_norm (Dr.GRPO): ``loss_sum = Σ_{b,t} L``, ``normalizer = B · L_max``.
    """
    mask = _check_loss_inputs(logp, advantages, mask, {"old_logp": old_logp,
                              "engine_logp": engine_logp, "ref_logp": ref_logp})
    if settings.kl_beta > 0 and ref_logp is None:
        raise NLAError("ref_logp is required when kl_beta > 0; pass the reference policy's "
                       "log-probs or set rl.kl_beta=0")
    old = logp.detach() if old_logp is None else old_logp.detach()
    keep = kept_rollouts(mask, old, engine_logp, settings.mismatch_threshold)
    kept = mask & keep[:, None]
    logp_k, old_k = _masked(logp, kept), _masked(old, kept)
    log_ratio = (logp_k - old_k).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = advantages.detach().float().to(logp.device)[:, None].expand_as(log_ratio)
    pg, clipped_high, clipped_low = POLICY_LOSSES[settings.kind](
        log_ratio, adv, settings.clip_low, settings.clip_high)
    weights = _is_weights(old_k, engine_logp, kept, settings.is_cap)
    per_token = weights * pg
    kl = None
    if ref_logp is not None:
        delta = (_masked(ref_logp.detach(), kept) - logp_k).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = KL_ESTIMATORS[settings.kl_estimator](delta)
        if settings.kl_beta > 0:
            per_token = per_token + settings.kl_beta * kl
    loss_sum, normalizer = AGGREGATIONS[settings.loss_agg](per_token, kept.float(),
                                                           settings.max_completion_tokens)
    stats = _loss_stats(kept, mask, keep, pg, log_ratio, weights, clipped_high, clipped_low, kl,
                        old, engine_logp, settings.is_cap)
    return PolicyLoss(loss_sum, normalizer, int(kept.sum()), stats)


@torch.no_grad()
def _loss_stats(kept, mask, keep, pg, log_ratio, weights, clipped_high, clipped_low, kl, old,
                engine_logp, cap) -> dict[str, float]:
    """Means over kept response tokens (``policy/*``); the mismatch over all response tokens."""
    tokens = max(int(kept.sum()), 1)

    def token_mean(x: torch.Tensor) -> float:
        return float(torch.where(kept, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum()
                     / tokens)

    stats = {
        "policy/pg_loss": token_mean(pg),
        "policy/clip_frac_high": token_mean(clipped_high),
        "policy/clip_frac_low": token_mean(clipped_low),
        "policy/approx_kl": token_mean(kl_k3(-log_ratio)),  # k3 estimate of KL(π‖π_old)
        "policy/is_weight_mean": token_mean(weights),
        "policy/is_capped_frac": token_mean(weights >= cap * (1 - 1e-6)),
        "policy/masked_rollouts": float((~keep).sum()),
        "policy/tokens": float(kept.sum()),
    }
    if kl is not None:
        stats["policy/ref_kl"] = token_mean(kl)
    if engine_logp is not None:
        diff = (old.float() - engine_logp.float()).abs()
        valid = mask & torch.isfinite(diff)
        stats["policy/logp_diff_abs_mean"] = float(
            torch.where(valid, diff, torch.zeros_like(diff)).sum() / max(int(valid.sum()), 1))
    return stats
