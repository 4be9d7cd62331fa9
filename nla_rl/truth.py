"""Truth and collapse, measured on every RL step: is the reward still buying true explanations?

A rising reward means nothing by itself: the AV can hack the online AR it is scored by, or
collapse onto a code (the same few explanations for every activation) that the AR learns to
decode. Three families of per-step numbers catch this, beside the reward:

- ``rollout/toy/*`` (toy world only): attribute recall/precision and optional-slot recall/precision
  of the rollouts against the ground truth (:func:`nla_rl.data.toyworld.score_explanations`).
- ``rollout/diversity/*`` (any data): ``distinct`` = distinct explanations / rollouts;
  ``distinct_2`` = distinct word bigrams / bigrams over all rollouts; ``cross_group`` = distinct
  explanations among the groups' first samples / groups (1 when every activation gets its own
  text, 1/P when all P activations get the same one: the signature of a collapse to a code).
- ``rollout/fve`` under the live (scoring) AR and ``rollout/fve_frozen_ar`` under the frozen
  AR-SFT final: a live FVE that climbs while the frozen one falls is the AV learning what the
  online AR was pushed into, not what the activation holds.

:class:`RewardTruthAlarm` turns those series into ``health/reward_up_truth_down`` (0/1) and a
console warning when the reward rises while frozen-AR FVE, diversity or toy precision fall.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nla_rl.data.toyworld import score_explanations


def toy_rollout_metrics(explanations: Sequence[str | None], truths: Sequence) -> dict[str, float]:
    """``rollout/toy/{recall,precision,slot_recall,slot_precision,no_mention_rate}`` of the
    rollouts (one truth per rollout; a failed explanation, None, names nothing)."""
    s = score_explanations(list(explanations), [frozenset(t) for t in truths])
    return {"rollout/toy/recall": s.recall, "rollout/toy/precision": s.precision,
            "rollout/toy/slot_recall": s.slot_recall, "rollout/toy/slot_precision": s.slot_precision,
            "rollout/toy/no_mention_rate": s.n_no_mention / s.n if s.n else math.nan}


def _words(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").split()


def diversity_metrics(explanations: Sequence[str | None], group_size: int) -> dict[str, float]:
    """``rollout/diversity/{distinct,distinct_2,cross_group}`` (module docstring); explanations are
    group-major (sample j of activation i at ``i * group_size + j``), failures (None) left out."""
    texts = [" ".join(_words(e)) for e in explanations if e is not None]
    if not texts:
        return {"rollout/diversity/distinct": 0.0, "rollout/diversity/distinct_2": 0.0,
                "rollout/diversity/cross_group": 0.0}
    bigrams = [tuple(w[i:i + 2]) for w in map(str.split, texts) for i in range(len(w) - 1)]
    firsts = [explanations[i] for i in range(0, len(explanations), group_size)]
    firsts = [" ".join(_words(e)) for e in firsts if e is not None]
    return {"rollout/diversity/distinct": len(set(texts)) / len(texts),
            "rollout/diversity/distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "rollout/diversity/cross_group": len(set(firsts)) / len(firsts) if firsts else 0.0}


# The truth series watched against the reward, each of which should not fall while it rises.
WATCHED = ("rollout/fve_frozen_ar", "rollout/diversity/cross_group", "rollout/toy/precision")


@dataclass
class RewardTruthAlarm:
    """Fires while the reward has risen since a truth series peaked and that series has fallen.

    Every series is smoothed by its mean over the last ``window`` steps (``x̄_t``). For each
    watched series present in the metrics, with ``p`` the step where ``x̄`` was highest and at
    least ``window`` steps before now (``t``): the alarm is on when ``x̄_t − x̄_p < −min_drop``
    (FVE, fractions and precisions live on a 0–1 scale) and ``r̄_t − r̄_p > min_rise · |r̄_p| +
    2 · sd(r over the last window) / √window`` (the reward rose beyond its noise). It stays on
    while the condition holds, so a lasting collapse keeps the flag up. ``check`` returns the
    step's ``health/*`` metrics and, the first step the alarm turns on, a warning text.
    """

    window: int = 10
    min_rise: float = 0.02
    min_drop: float = 0.05
    recent: dict[str, deque] = field(default_factory=dict)
    smoothed: list[dict[str, float]] = field(default_factory=list)  # x̄ of every series, per step
    on: bool = False

    def check(self, metrics: dict[str, float]) -> tuple[dict[str, float], str | None]:
        for key in ("reward/mean", *WATCHED):
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                self.recent.setdefault(key, deque(maxlen=self.window)).append(float(value))
        self.smoothed.append({k: float(np.mean(v)) for k, v in self.recent.items()
                              if len(v) == self.window})
        falling = {k: (drop, rise) for k in WATCHED
                   if (trend := self._trend(k)) is not None
                   for drop, rise in [trend] if drop < -self.min_drop and rise > self._noise()}
        was_on, self.on = self.on, bool(falling)
        out = {"health/reward_up_truth_down": float(self.on)}
        warning = None
        if self.on and not was_on:
            what = ", ".join(f"{k} {d:+.3f} while the reward moved {r:+.4f}"
                             for k, (d, r) in falling.items())
            warning = (f"since their best {self.window}-step window: {what}. The AV may be "
                       "hacking the online AR or collapsing to a code; check the samples and "
                       "rollout/fve_frozen_ar before trusting the reward")
        return out, warning

    def _trend(self, key: str) -> tuple[float, float] | None:
        """(x̄_t − x̄_p, r̄_t − r̄_p) from the series' peak p (at least a window back), or None."""
        now = self.smoothed[-1]
        if key not in now or "reward/mean" not in now:
            return None
        past = [(s[key], i) for i, s in enumerate(self.smoothed[: -self.window])
                if key in s and "reward/mean" in s]
        if not past:
            return None
        peak, at = max(past)
        return now[key] - peak, now["reward/mean"] - self.smoothed[at]["reward/mean"]

    def _noise(self) -> float:
        rewards = self.recent.get("reward/mean", ())
        spread = float(np.std(rewards)) / math.sqrt(len(rewards)) if rewards else 0.0
        peak = abs(self.smoothed[-1].get("reward/mean", 0.0))
        return self.min_rise * peak + 2 * spread
