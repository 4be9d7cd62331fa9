"""Rollout health: the signs that an RL run is broken rather than merely learning slowly.

``health/*`` metrics, logged every step:

- ``cjk_rate``: fraction of rollouts containing a CJK/fullwidth character. The marker lives in
  U+3200-U+33FF, and a policy that lost the injection (or drifted) often starts emitting such
  characters, or echoes the marker.
- ``injection_applied`` / ``injection_expected``: markers the engine actually replaced vs. prompts
  sent. Fewer applied than expected means the AV generated without seeing the activation.
- ``logp_mismatch_mean`` / ``logp_mismatch_max``: ``|logp_learner - logp_engine|`` averaged over
  all response tokens, and the largest per-rollout mean (what the loss's mismatch mask compares).
- ``extraction_failure_rate``: rollouts with no ``<explanation>…</explanation>``.
- ``skipped_steps``: optimiser steps skipped so far for non-finite gradients.

:func:`check_step0_health` turns the first step's metrics into a clear error when the setup is
broken, instead of a run that trains on noise for hours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nla_rl.errors import NLAError
from nla_rl.grpo import rollout_logp_mismatch

# (name, first, last) code points, inclusive. The second range lies inside the first; it is listed
# by name because the marker is drawn from it.
CJK_RANGES: tuple[tuple[str, int, int], ...] = (
    ("CJK radicals, kana, bopomofo, CJK ideographs", 0x2E80, 0x9FFF),
    ("enclosed CJK letters and months, CJK compatibility", 0x3200, 0x33FF),
    ("Hangul syllables", 0xAC00, 0xD7AF),
    ("CJK compatibility ideographs", 0xF900, 0xFAFF),
    ("halfwidth and fullwidth forms", 0xFF00, 0xFFEF),
)
MAX_STEP0_EXTRACTION_FAILURES = 0.5


class HealthError(NLAError):
    """The rollouts show that the RL setup is broken (injection lost, unparseable outputs)."""


def has_cjk(text: str) -> bool:
    """Whether ``text`` contains a character from one of :data:`CJK_RANGES`."""
    return any(first <= ord(ch) <= last for ch in text for _, first, last in CJK_RANGES)


def cjk_rate(texts: Sequence[str]) -> float:
    """Fraction of ``texts`` containing at least one CJK character (0 for no texts)."""
    return sum(has_cjk(t) for t in texts) / len(texts) if texts else 0.0


def rollout_health(texts: Sequence[str], explanations: Sequence[str | None], *,
                   injection_applied: int, injection_expected: int,
                   learner_logp: torch.Tensor | None = None,
                   engine_logp: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   skipped_steps: int = 0) -> dict[str, float]:
    """The ``health/*`` metrics of one step (see the module docstring).

    ``texts``: decoded rollouts; ``explanations``: what :func:`nla_rl.templates.extract_explanation`
    gave for each (None = failure); log-probs [B, T] with the response ``mask`` (optional: the
    mismatch metrics are left out without them).
    """
    if len(explanations) != len(texts):
        raise NLAError(f"explanations: expected one per rollout text ({len(texts)}), "
                       f"found {len(explanations)}")
    failures = sum(e is None for e in explanations)
    metrics = {
        "health/cjk_rate": cjk_rate(texts),
        "health/injection_applied": float(injection_applied),
        "health/injection_expected": float(injection_expected),
        "health/extraction_failure_rate": failures / len(texts) if texts else 0.0,
        "health/skipped_steps": float(skipped_steps),
    }
    if learner_logp is not None and engine_logp is not None:
        mask = torch.ones_like(learner_logp, dtype=torch.bool) if mask is None else mask.bool()
        diff = (learner_logp.detach().float() - engine_logp.detach().float()).abs()
        valid = mask & torch.isfinite(diff)
        per_rollout = rollout_logp_mismatch(learner_logp, engine_logp, mask)
        metrics["health/logp_mismatch_mean"] = float(diff[valid].mean()) if valid.any() else 0.0
        metrics["health/logp_mismatch_max"] = float(per_rollout.max()) if per_rollout.numel() else 0.0
    return metrics


def check_step0_health(metrics: dict[str, float]) -> None:
    """Raise :class:`HealthError` when the first step shows a broken setup; return otherwise.

    Broken: ``health/injection_applied < health/injection_expected`` (the AV did not see the
    activation), or ``health/extraction_failure_rate > 0.5`` (the AV does not write explanations).
    """
    needed = ("health/injection_applied", "health/injection_expected",
              "health/extraction_failure_rate")
    missing = [k for k in needed if k not in metrics]
    if missing:
        raise HealthError(f"step-0 health check: metrics {missing} are missing; pass the output "
                          "of nla_rl.health.rollout_health")
    applied, expected = metrics["health/injection_applied"], metrics["health/injection_expected"]
    if applied < expected:
        raise HealthError(
            f"step-0 health check: the activation was injected into {applied:g} of {expected:g} "
            "prompts, so the AV generated without seeing it. Check that the marker token id "
            "matches the sidecar (nla_meta.yaml), that the engine received prompt embeddings "
            "(not token ids) for every prompt, and that its prefix cache is off or keyed on the "
            "embeddings.")
    rate = metrics["health/extraction_failure_rate"]
    if rate > MAX_STEP0_EXTRACTION_FAILURES:
        raise HealthError(
            f"step-0 health check: {rate:.0%} of rollouts have no <explanation>…</explanation> "
            f"(limit {MAX_STEP0_EXTRACTION_FAILURES:.0%}). Check that the AV is the AV-SFT "
            "checkpoint, that templates.av and templates.av_prefill match the ones it was trained "
            "with, and that rl.max_new_tokens leaves room to close the explanation.")
