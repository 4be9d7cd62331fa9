"""A rollout pool survives a lost engine actor and refuses a cluster too small for it.

Real Ray actors hosting the ``hf`` engine (no vLLM start-up): an actor killed after a weight sync
is replaced, gets the synced weights again, and re-runs its slice with the same seeds, so the
results equal those of the pool before it lost the actor.
"""

from __future__ import annotations

import shutil

import pytest

from actors.placement import PlacementError
from actors.rollout import EngineLostError, RolloutPool
from rollout.base import EngineSpec, SamplingSpec
from tests.integration._engine_setup import (INJECTIONS, build_model, make_requests, marker_of,
                                             max_abs_diff, perturbed_state)
from tests.integration._ray_kill import kill_and_wait

SAMPLED = SamplingSpec(n=2, temperature=1.0, max_new_tokens=6, seed=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery_model")
    model, tok = build_model(root / "model", seed=3)
    marker = marker_of(tok)
    return {"model": model, "root": root, "requests": make_requests(tok, marker, model.config.hidden_size),
            "kwargs": dict(model_dir=str(root / "model"), marker=marker, injection=INJECTIONS["replace"])}


def token_ids(groups):
    return [[s.token_ids for s in group] for group in groups]


def test_lost_actor_is_replaced_with_the_latest_weights(ray_cluster, tiny, capfd):
    pool = RolloutPool(EngineSpec.from_kwargs("hf", **tiny["kwargs"]),
                       num_engines=2, num_cpus_per_engine=1)
    try:
        reqs = tiny["requests"]  # 5 requests: actor 0 serves [0, 3), actor 1 serves [3, 5)
        unsynced = token_ids(pool.generate(reqs, SAMPLED))
        pool.sync_weights(perturbed_state(tiny["model"]).state_dict().items())
        synced = token_ids(pool.generate(reqs, SAMPLED))
        assert synced[3:] != unsynced[3:]  # the weights matter for the slice of the actor lost below
        pids = [h["pid"] for h in pool.health()]

        lost = pool.actors[1]
        kill_and_wait(lost)
        assert token_ids(pool.generate(reqs, SAMPLED)) == synced

        health = pool.health()
        assert len(pool.actors) == 2 and pool.actors[1] is not lost
        assert health[0]["pid"] == pids[0] and health[1]["pid"] not in pids
        assert health[1]["syncs"] == 1 and health[1]["samples"] == 2 * 2  # synced once, served 2 requests

        completions = [group[0] for group in synced]
        expected = pool.logprobs(reqs, completions)
        kill_and_wait(pool.actors[0])
        assert max_abs_diff(pool.logprobs(reqs, completions), expected) < 1e-6
    finally:
        pool.shutdown()
    out = capfd.readouterr().out
    assert out.count("engine actor 1 lost") == 1 and out.count("engine actor 0 lost") == 1


def test_cluster_too_small_fails_at_once(ray_cluster, tiny):
    cpus = ray_cluster.cluster_resources()["CPU"]
    with pytest.raises(PlacementError, match=rf"need {cpus + 1:g} CPU.*has {cpus:g} CPU.*engine.num_engines"):
        RolloutPool(EngineSpec.from_kwargs("hf", **tiny["kwargs"]),
                    num_engines=2, num_cpus_per_engine=(cpus + 1) / 2)
    gpus = ray_cluster.cluster_resources().get("GPU", 0.0)
    with pytest.raises(PlacementError, match="GPU.*engine.tensor_parallel_size"):
        RolloutPool(EngineSpec.from_kwargs("hf", **tiny["kwargs"]),
                    num_engines=1, num_gpus_per_engine=gpus + 1)


def test_replacements_exhausted_raise_a_clear_error(ray_cluster, tiny, capfd):
    """The model directory disappears after start-up, so every replacement dies while loading."""
    model_dir = shutil.copytree(tiny["root"] / "model", tiny["root"] / "vanishing")
    pool = RolloutPool(EngineSpec.from_kwargs("hf", **{**tiny["kwargs"], "model_dir": str(model_dir)}),
                       num_engines=1,
                       num_cpus_per_engine=1, max_replacements=1)
    try:
        shutil.rmtree(model_dir)
        kill_and_wait(pool.actors[0])
        with pytest.raises(EngineLostError, match="actor 0 died during generate.*1 replacement"):
            pool.generate(tiny["requests"][:2], SAMPLED)
    finally:
        pool.shutdown()
    assert capfd.readouterr().out.count("engine actor 0 lost") == 1
