"""No silent hangs: a remote call's deadline (floor, factor x recent times), a learner rank that
misses it stops the group with one error, and an unreachable RAY_ADDRESS fails at once.
Ray's calls are faked here; tests/integration/test_no_silent_hangs.py stalls real actors."""

from __future__ import annotations

import time

import pytest
import ray

from actors.cluster import RayConnectError, connect_ray
from actors.deadline import CallDeadline
from actors.learner import LearnerGroup, LearnerHungError, LearnerLostError
from nla_rl.config import load_recipe
from tests.unit.test_config import TINY_RECIPE


def test_the_deadline_is_the_floor_until_calls_are_timed():
    deadline = CallDeadline(floor_s=5.0, factor=3.0, window=2)
    assert deadline.seconds("generate") == 5.0
    deadline.observe(1.0)  # a step: bounds every phase
    assert deadline.seconds("generate") == 5.0
    deadline.observe(4.0, "save checkpoint")  # a phase: bounds itself only
    assert deadline.seconds("save checkpoint") == 12.0 and deadline.seconds("generate") == 5.0
    deadline.observe(3.0)
    assert deadline.seconds("generate") == 9.0
    deadline.observe(1.0)
    deadline.observe(1.0)  # the 3 s step has left the window of 2
    assert deadline.seconds("generate") == 5.0


def test_the_recipe_keys_set_it_and_are_checked():
    cfg = load_recipe(TINY_RECIPE, ["run.call_timeout_floor_s=7", "run.call_timeout_factor=2"])
    deadline = CallDeadline.from_run(cfg.run)
    assert (deadline.floor_s, deadline.factor) == (7.0, 2.0)
    with pytest.raises(Exception, match="call_timeout_floor_s: must be > 0"):
        load_recipe(TINY_RECIPE, ["run.call_timeout_floor_s=0"])
    with pytest.raises(Exception, match="call_timeout_factor: must be >= 1"):
        load_recipe(TINY_RECIPE, ["run.call_timeout_factor=0.5"])


class _Ref:
    def __init__(self, rank: int, state: str):
        self.rank, self.state = rank, state


def _group(monkeypatch, states: list[str], tmp_path) -> LearnerGroup:
    """A group of fake ranks: "ok" answers, "error" raises, "hung" never answers."""
    from types import SimpleNamespace

    from nla_rl.checkpoint import CheckpointManager

    def wait(refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r.state != "hung"][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(ref):
        if ref.state == "error":
            raise RuntimeError(f"rank {ref.rank} failed")
        if ref.state == "lost":  # what Ray raises for an actor whose node was removed
            raise ray.exceptions.RayActorError(
                error_msg="The actor died unexpectedly before finishing this task. The actor "
                          "died because its node has died. Node Id: 0e73927d")
        if ref.state == "died":
            raise ray.exceptions.ActorDiedError()
        return ref.rank

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda rank: setattr(rank, "state", "killed"))
    group = object.__new__(LearnerGroup)
    group.name, group.world_size = "rl_av", len(states)
    group.spec = SimpleNamespace(model=SimpleNamespace(role="av"))
    group.deadline = CallDeadline(floor_s=0.01, factor=1.0)
    group.checkpoints = CheckpointManager(tmp_path / "rl" / "av", fingerprint="x")
    group.placement, group.ranks = None, [SimpleNamespace(state=s) for s in states]
    group.refs = [_Ref(r, s) for r, s in enumerate(states)]
    return group


def test_a_silent_rank_stops_the_group_naming_rank_phase_and_checkpoint(monkeypatch, tmp_path):
    group = _group(monkeypatch, ["ok", "hung"], tmp_path)
    ranks = group.ranks
    with pytest.raises(LearnerHungError) as err:
        group._gather(group.refs, "grpo update")
    message = str(err.value)
    assert "learner rl_av: rank 1 did not answer (rank 0 did) within 0.01s during grpo update" \
        in message
    assert f"Last completed checkpoint: none yet in {tmp_path / 'rl' / 'av'}" in message
    assert "run.call_timeout_floor_s" in message and "run.resume=true" in message
    assert group.ranks == []  # killed: a hung rank holds its devices and its peers
    assert [r.state for r in ranks] == ["killed", "killed"]


def test_all_ranks_silent_and_a_rank_error_first(monkeypatch, tmp_path):
    group = _group(monkeypatch, ["hung", "hung"], tmp_path)
    with pytest.raises(LearnerHungError, match="none of ranks 0-1 answered .* during ar step"):
        group._gather(group.refs, "ar step")
    group = _group(monkeypatch, ["hung", "error"], tmp_path)  # rank 1's own error, at once
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        group._gather(group.refs, "ar step")
    group = _group(monkeypatch, ["ok", "ok"], tmp_path)
    assert group._gather(group.refs, "ar step") == [0, 1]
    assert group.deadline.seconds("ar step") >= 0.01  # the answered call was timed


def test_a_lost_rank_stops_the_group_naming_rank_phase_cause_and_checkpoint(monkeypatch,
                                                                          tmp_path):
    group = _group(monkeypatch, ["hung", "lost"], tmp_path)  # rank 0 waits on rank 1 forever
    ranks = group.ranks
    with pytest.raises(LearnerLostError) as err:
        group._gather(group.refs, "sync weights")
    assert str(err.value).startswith(
        "learner rl_av: rank 1 of 2 was lost during sync weights: its node died; the run is "
        f"stopped. Last completed checkpoint: none yet in {tmp_path / 'rl' / 'av'}.")
    assert "learner_av.log" in str(err.value) and "run.resume=true" in str(err.value)
    assert group.ranks == [] and [r.state for r in ranks] == ["killed", "killed"]
    group = _group(monkeypatch, ["died", "ok"], tmp_path)
    with pytest.raises(LearnerLostError, match=r"rank 0 of 2 was lost during ar step: its "
                       r"process died \(ActorDiedError\)"):
        group._gather(group.refs, "ar step")


def test_an_unreachable_ray_address_fails_at_once_naming_it(monkeypatch):
    # As in a fresh driver, whatever an earlier test in this process started; Ray must not be
    # asked to join (it would retry an unreachable head forever).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    started = time.perf_counter()
    with pytest.raises(RayConnectError) as err:
        connect_ray()
    assert time.perf_counter() - started < 30
    message = str(err.value)
    assert "RAY_ADDRESS=127.0.0.1:1" in message and "127.0.0.1:1 (Connection refused)" in message
    assert "ray start --head" in message and "unset RAY_ADDRESS" in message
