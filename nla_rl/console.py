"""What the console shows of an RL run: one compact line per step above a progress bar.

    rl   12/80  reward -0.412  fve 0.310  kl 0.0021  len 23.4  recall 0.62  prec 0.71  4.2s

The numbers a person reads to judge the run (the full set is in ``logs/metrics.jsonl``); a
field whose metric was not logged is left out, a NaN one reads ``n/a``.
"""

from __future__ import annotations

import math
from typing import Mapping

# (label, metric names in order of preference: the first one logged is shown)
STEP_FIELDS = (
    ("reward", ("reward/mean",)),
    ("fve", ("rollout/fve",)),
    ("kl", ("train/av/kl",)),  # to the reference policy (rl.kl_beta > 0)
    ("kl_old", ("train/av/approx_kl",)),  # to the rollout policy, shown when there is no kl
    ("len", ("rollout/mean_tokens",)),
    ("recall", ("rollout/toy/recall",)),  # ground truth, where the data has it (toy world)
    ("prec", ("rollout/toy/precision",)),
)


def _number(value) -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    value = float(value)
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.2e}"
    return f"{value:.3g}"


def step_line(stage: str, step: int, total: int, metrics: Mapping[str, float]) -> str:
    """The one line of a step (see the module docstring)."""
    width = len(str(total))
    parts = [f"{stage} {step:>{width}}/{total}"]
    for label, names in STEP_FIELDS:
        if label == "kl_old" and "train/av/kl" in metrics:
            continue
        name = next((n for n in names if n in metrics), None)
        if name is not None:
            parts.append(f"{label} {_number(metrics[name])}")
    if "perf/step_s" in metrics:
        parts.append(f"{float(metrics['perf/step_s']):.1f}s")
    return "  ".join(parts)


class StepConsole:
    """A progress bar over a stage's steps with :func:`step_line` written above it each step
    (the bar starts at the first logged step, so a resumed run shows where it resumed)."""

    def __init__(self, stage: str, total: int, *, file=None):
        self.stage, self.total, self.file = stage, total, file
        self._bar = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.total, initial=step - 1, desc=self.stage, unit="step",
                             file=self.file, dynamic_ncols=True)
        self._bar.update(step - self._bar.n)
        self._bar.write(step_line(self.stage, step, self.total, metrics), file=self.file)
        if step >= self.total:  # done: what the stage prints next goes below the bar
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
