"""Optimiser, learning-rate schedule, and the guarded optimiser step.

The guarded step is where "non-finite numbers never reach the weights" is enforced: the gradient
norm is computed (or given) before anything is applied, and a step whose norm is NaN or Inf is
skipped entirely — gradients dropped, optimiser state and learning-rate schedule untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from nla_rl.errors import ConfigError, mismatch

SCHEDULES = ("cosine", "constant", "wsd")
# wsd (warmup-stable-decay): the share of the post-warm-up steps spent decaying linearly to 0.
WSD_DECAY_FRACTION = 0.2
# Parameters whose name contains one of these are never weight-decayed (with ndim < 2 ones).
_NO_DECAY_NAME_PARTS = ("bias", "norm")


@dataclass(frozen=True)
class StepResult:
    """Outcome of :func:`guarded_step`: the pre-clip gradient norm, whether the step was skipped
    (non-finite norm), and the learning rate the step used (that it would have used, if skipped)."""

    grad_norm: float
    skipped: bool
    lr: float


# ---------------------------------------------------------------------------------- optimiser

def _decays(name: str, param: torch.Tensor) -> bool:
    lowered = name.lower()
    return param.ndim >= 2 and not any(part in lowered for part in _NO_DECAY_NAME_PARTS)


def param_groups(params, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: named parameters are split into decayed matrices and undecayed
    biases / norm weights (anything 1-D or named ``*bias*`` / ``*norm*``); plain parameters form
    one decayed group. Frozen parameters (``requires_grad=False``) are left out."""
    params = list(params)
    if not params:
        raise ConfigError("the optimiser got no parameters")
    if not isinstance(params[0], tuple):
        return [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    decay = [p for n, p in params if p.requires_grad and _decays(n, p)]
    no_decay = [p for n, p in params if p.requires_grad and not _decays(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors, or ``named_parameters()`` pairs to exempt biases and norm
    weights from weight decay). Works for FSDP2 (DTensor) parameters as they are."""
    if not lr > 0 or not math.isfinite(lr):
        raise ConfigError(mismatch("learning rate", "a finite value > 0", lr))
    if weight_decay < 0:
        raise ConfigError(mismatch("weight_decay", ">= 0", weight_decay))
    groups = param_groups(params, weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("every parameter is frozen (requires_grad=False): nothing to train")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


# ---------------------------------------------------------------------------------- schedule

def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                  min_ratio: float = 0.0) -> float:
    """Factor of the peak learning rate used by optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step already
    learns). Then ``constant``: 1; ``cosine``: ``m + (1 - m) · ½ (1 + cos(π p))`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1] and
    ``m = min_ratio``, so the multiplier decays from 1 to ``m`` at ``total_steps``; ``wsd``: 1,
    then over the last ``f = WSD_DECAY_FRACTION`` of the post-warm-up steps ``m + (1 - m) (1 - p')``
    with ``p' = (p - (1 - f)) / f`` (a constant rate while the model learns, then an anneal).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(mismatch("schedule", list(SCHEDULES), schedule))
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"schedule: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                          f"found total_steps={total_steps}, warmup_steps={warmup_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ConfigError(mismatch("min_ratio", "a value in [0, 1]", min_ratio))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "wsd":
        tail = max(0.0, progress - (1.0 - WSD_DECAY_FRACTION)) / WSD_DECAY_FRACTION
        return min_ratio + (1.0 - min_ratio) * (1.0 - tail)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg=None, *, warmup_steps: int | None = None,
                    total_steps: int | None = None, schedule: str | None = None,
                    min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier`; settings from an ``SFTConfig`` (``steps``,
    ``warmup_steps``, ``schedule``) and/or keywords (keywords win). The scheduler is stepped once
    per *taken* optimiser step, so skipped steps do not advance it."""
    settings = {
        "warmup_steps": getattr(cfg, "warmup_steps", 0) if warmup_steps is None else warmup_steps,
        "total_steps": getattr(cfg, "steps", None) if total_steps is None else total_steps,
        "schedule": getattr(cfg, "schedule", "constant") if schedule is None else schedule,
        "min_ratio": min_ratio,
    }
    if settings["total_steps"] is None:
        raise ConfigError("build_scheduler needs total_steps (or a config with `steps`)")
    lr_multiplier(0, **settings)  # validate now, not at the first step
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, **settings))


# ---------------------------------------------------------------------------------- the step

def _full_value(norm) -> float:
    """A Python float of a (possibly DTensor) scalar norm."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def guarded_step(parameters: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                 scheduler=None, *, max_norm: float,
                 grad_norm: torch.Tensor | float | None = None) -> StepResult:
    """Clip gradients to ``max_norm`` and step, unless the gradient norm is not finite.

    ``grad_norm=None``: the global L2 norm is computed by ``torch.nn.utils.clip_grad_norm_``
    (for FSDP2 DTensor gradients it is the norm over all shards, identical on every rank, so all
    ranks take the same decision). A backend that computes the norm itself (DeepSpeed) passes it,
    and the gradients are scaled by ``min(1, max_norm / (norm + 1e-6))``.
    Finite norm: optimiser step, scheduler step, gradients zeroed. Non-finite: gradients zeroed,
    neither the optimiser nor the scheduler steps, ``skipped=True``.
    """
    params = [p for p in parameters if p.grad is not None]
    lr = current_lr(optimizer)
    if grad_norm is None:
        norm = _full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    else:
        norm = _full_value(grad_norm)
        if math.isfinite(norm) and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=True, lr=lr)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(grad_norm=norm, skipped=False, lr=lr)
