"""An engine replacement is recorded (engine, cause, method, seconds lost) and logged as step
metrics, not only printed. The pool's retry path runs here with Ray's calls faked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

import actors.rollout as rollout
from actors.rollout import EngineReplacement, RolloutPool, replacement_metrics


class FakeRef:
    def __init__(self, value=None, lost: bool = False):
        self.value, self.lost = value, lost


class FakeActor:
    """Each method's ``.remote(*args)`` returns a ref; a dead actor's refs raise when fetched."""

    def __init__(self, name: str, dead: bool = False):
        self.name, self.dead = name, dead

    def __getattr__(self, method):
        return SimpleNamespace(remote=lambda *args: FakeRef((self.name, method, args), self.dead))


def _get(ref):
    if isinstance(ref, list):
        return [_get(r) for r in ref]
    if ref.lost:
        raise ray.exceptions.RayActorError()
    return ref.value


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(rollout, "ray", SimpleNamespace(get=_get, kill=lambda *a, **k: None))
    pool = object.__new__(RolloutPool)  # no Ray cluster: only the retry bookkeeping runs
    pool.actors = [FakeActor("a0"), FakeActor("a1", dead=True)]
    pool.max_replacements, pool.replacements = 2, []
    pool._weights_ref, pool._adapter_dir = None, None
    fresh = iter([FakeActor("a1'")])
    pool._start_actor = lambda index: next(fresh)
    return pool


def test_a_replacement_is_recorded_once_and_drained(pool, capsys):
    out = pool._call([(0, "generate", ("x",)), (1, "generate", ("y",))])
    assert out == [("a0", "generate", ("x",)), ("a1'", "generate", ("y",))]
    [event] = pool.replacements
    assert (event.engine, event.cause, event.method) == (1, "RayActorError", "generate")
    assert event.seconds >= 0
    assert pool.drain_replacements() == [event] and pool.drain_replacements() == []
    pool._call([(0, "generate", ("x",)), (1, "generate", ("y",))])  # no loss: nothing recorded
    assert pool.replacements == []
    assert "engine actor 1 lost" in capsys.readouterr().out


def test_replacement_metrics_count_and_seconds(capsys):
    assert replacement_metrics([], step=3) == {"health/engine_replacements": 0.0,
                                               "perf/engine_replacement_s": 0.0}
    events = [EngineReplacement(1, "RayActorError", "generate", 2.5),
              EngineReplacement(0, "ActorDiedError", "logprobs", 1.0)]
    assert replacement_metrics(events, step=7) == {"health/engine_replacements": 2.0,
                                                   "perf/engine_replacement_s": 3.5}
    out = capsys.readouterr().out
    assert "step 7: engine 1 replaced (RayActorError during generate), 2.5s lost" in out
