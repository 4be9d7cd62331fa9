"""An engine replacement is recorded (engine, cause, method, seconds lost) and logged as step
metrics, not only printed; an engine that misses its deadline is killed and replaced like a dead
one. The pool's retry path runs here with Ray's calls faked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

import actors.rollout as rollout
from actors.deadline import CallDeadline
from actors.rollout import EngineReplacement, RolloutPool, replacement_metrics


class FakeRef:
    def __init__(self, value=None, state: str = "ok"):
        self.value, self.state = value, state


class FakeActor:
    """Each method's ``.remote(*args)`` returns a ref; a dead actor's refs raise when fetched,
    a hung one's never arrive (the fetch times out)."""

    def __init__(self, name: str, state: str = "ok"):
        self.name, self.state = name, state

    def __getattr__(self, method):
        return SimpleNamespace(remote=lambda *args: FakeRef((self.name, method, args), self.state))


def _get(ref, timeout=None):
    if isinstance(ref, list):
        return [_get(r, timeout) for r in ref]
    if ref.state == "dead":
        raise ray.exceptions.RayActorError()
    if ref.state == "hung":
        assert timeout is not None  # a hung actor would block a get without one forever
        raise ray.exceptions.GetTimeoutError()
    return ref.value


def make_pool(monkeypatch, lost: str) -> RolloutPool:
    killed = []
    monkeypatch.setattr(rollout, "ray", SimpleNamespace(
        get=_get, kill=lambda actor, **k: killed.append(actor.name), exceptions=ray.exceptions))
    pool = object.__new__(RolloutPool)  # no Ray cluster: only the retry bookkeeping runs
    pool.actors = [FakeActor("a0"), FakeActor("a1", state=lost)]
    pool.max_replacements, pool.replacements, pool.call_seconds = 2, [], []
    pool.deadline, pool.killed = CallDeadline(floor_s=0.01, factor=2.0), killed
    pool._weights_refs, pool._adapter_dir = None, None
    fresh = iter([FakeActor("a1'")])
    pool._start_actor = lambda index: next(fresh)
    return pool


@pytest.fixture
def pool(monkeypatch):
    return make_pool(monkeypatch, lost="dead")


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
                                               "health/engine_deadline_misses": 0.0,
                                               "perf/engine_replacement_s": 0.0}
    events = [EngineReplacement(1, "RayActorError", "generate", 2.5),
              EngineReplacement(0, "ActorDiedError", "logprobs", 1.0)]
    assert replacement_metrics(events, step=7) == {"health/engine_replacements": 2.0,
                                                   "health/engine_deadline_misses": 0.0,
                                                   "perf/engine_replacement_s": 3.5}
    out = capsys.readouterr().out
    assert "step 7: engine 1 replaced (RayActorError during generate), 2.5s lost" in out


def test_an_engine_that_misses_its_deadline_is_killed_and_replaced(monkeypatch, capsys):
    pool = make_pool(monkeypatch, lost="hung")
    out = pool._call([(0, "generate", ("x",)), (1, "generate", ("y",))])
    assert out == [("a0", "generate", ("x",)), ("a1'", "generate", ("y",))]
    assert pool.killed == ["a1"]
    [event] = pool.drain_replacements()
    assert event.missed_deadline and event.cause.startswith("no answer within")
    assert "during generate" in event.cause
    metrics = {**replacement_metrics([event], step=2), **pool.heartbeat()}
    assert metrics["health/engine_replacements"] == metrics["health/engine_deadline_misses"] == 1
    assert metrics["health/engine_deadline_s"] == pool.deadline.seconds("generate") >= 0.01
    assert metrics["health/engine_last_call_s"] >= 0
    assert pool.heartbeat()["health/engine_last_call_s"] == 0.0  # drained
    assert "engine actor 1 lost (no answer within" in capsys.readouterr().out
