"""Deadlines of remote calls: no ``ray.get`` of the RL, SFT or datagen loop waits forever.

A call of phase ``p`` may take ``max(floor_s, factor × the longest of the last 10 durations)``,
the durations being the loop's recent step times (an RL or SFT step, a datagen shard) and the
recent calls of the same phase (a checkpoint save is timed against earlier saves too, a
replacement engine's start-up against the pool's own). Before anything is measured, the floor
alone (``run.call_timeout_floor_s``). What a missed deadline means is the caller's: an engine is
killed and replaced (:class:`actors.rollout.RolloutPool`), a learner rank stops the run
(:class:`actors.learner.LearnerHungError`), a datagen worker stops the stage.
"""

from __future__ import annotations

import threading
from collections import deque

STEP = "step"  # the loop's own step times, shared by every phase
WINDOW = 10


class CallDeadline:
    """The one place a call's deadline is resolved (see the module doc). Shared by every actor
    group of a run; the loops :meth:`observe` their step times, the groups their calls."""

    def __init__(self, floor_s: float, factor: float, window: int = WINDOW):
        self.floor_s, self.factor, self.window = float(floor_s), float(factor), window
        self._recent: dict[str, deque] = {}
        self._lock = threading.Lock()  # the coordinator trains the AV and the AR in two threads

    @classmethod
    def from_run(cls, run=None) -> CallDeadline:
        """From a recipe's ``run`` section (``None``: its defaults)."""
        if run is None:
            from nla_rl.config import RunConfig

            run = RunConfig()
        return cls(run.call_timeout_floor_s, run.call_timeout_factor)

    def observe(self, seconds: float, phase: str = STEP) -> None:
        with self._lock:
            self._recent.setdefault(phase, deque(maxlen=self.window)).append(float(seconds))

    def seconds(self, phase: str = STEP) -> float:
        """How long a call of ``phase`` may take from its launch."""
        with self._lock:
            recent = [*self._recent.get(STEP, ()), *self._recent.get(phase, ())]
        return max(self.floor_s, self.factor * max(recent, default=0.0))


class DeadlineMissed(Exception):
    """A remote call did not answer within its deadline (raised and handled inside ``actors``)."""

    def __init__(self, phase: str, seconds: float):
        super().__init__(f"no answer within {seconds:.3g}s during {phase}")
        self.phase, self.seconds = phase, seconds
