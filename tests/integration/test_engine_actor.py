"""vLLM engines inside Ray actors: a pool of two, load-balanced, results in request order,
weight sync and its verification broadcast to every actor."""

from __future__ import annotations

import pytest
import torch

from actors.rollout import RolloutPool, core_binds, split_evenly
from rollout.base import EngineSpec, SamplingSpec, WeightSyncError, make_engine
from rollout.hf_engine import teacher_forced_logprobs
from tests.integration._engine_setup import (ENGINE_KWARGS, INJECTIONS, build_model, make_requests,
                                             marker_of, perturbed_state)

pytest.importorskip("vllm")
SPEC = INJECTIONS["replace"]
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=10)


def test_split_and_binds():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert core_binds(2, 2) == ["0", "1"] and core_binds(1, 4) == ["0-3"] and core_binds(3, 2) == ["0", "1", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("actor_model")
    model, tok = build_model(root / "model", seed=3)
    marker = marker_of(tok)
    kwargs = dict(model_dir=str(root / "model"), marker=marker, injection=SPEC)
    pool = RolloutPool(EngineSpec.from_kwargs("vllm", **{**kwargs, **ENGINE_KWARGS}),
                       num_engines=2, num_cpus_per_engine=1)
    yield {"model": model, "marker": marker, "pool": pool, "hf": make_engine("hf", **kwargs),
           "requests": make_requests(tok, marker, model.config.hidden_size)}
    pool.shutdown()


def test_pool_matches_reference_in_request_order(setup):
    reqs = setup["requests"]
    got = setup["pool"].generate(reqs, GREEDY)
    ref = setup["hf"].generate(reqs, GREEDY)
    assert [g[0].token_ids for g in got] == [r[0].token_ids for r in ref]
    health = setup["pool"].health()
    assert len({h["pid"] for h in health}) == 2
    assert [h["samples"] for h in health] == [3, 2]  # 5 requests split 3 + 2
    sampled = SamplingSpec(n=2, temperature=1.0, max_new_tokens=6, seed=4)
    first = setup["pool"].generate(reqs, sampled)
    assert [[s.token_ids for s in g] for g in setup["pool"].generate(reqs, sampled)] == \
        [[s.token_ids for s in g] for g in first]


def test_weight_sync_broadcast_and_verify(setup):
    learner = perturbed_state(setup["model"])
    reqs = setup["requests"][:2]
    completions = [g[0].token_ids for g in setup["hf"].generate(reqs, GREEDY)]
    cols = [list(r.prompt_ids).index(setup["marker"].token_id) for r in reqs]
    expected = teacher_forced_logprobs(learner, [r.prompt_ids for r in reqs], completions,
                                       torch.stack([r.vector for r in reqs]), cols, SPEC)
    with pytest.raises(WeightSyncError):
        setup["pool"].verify_sync(expected, (reqs, completions))
    setup["pool"].sync_weights(learner.state_dict().items())
    assert setup["pool"].verify_sync(expected, (reqs, completions), tol=1e-4) < 1e-4


def test_weight_sync_in_buckets_keeps_the_sent_bits(setup):
    """One bucket per decoder block (each travels as its own object) still syncs every weight,
    and the engines only read the object store's shared copies: the buckets the pool keeps for a
    replacement actor still hold exactly the bits that were sent."""
    import ray

    from rollout.vllm_worker import unpack_tensor

    learner = perturbed_state(setup["model"], seed=5)
    reqs = setup["requests"][:2]
    completions = [g[0].token_ids for g in setup["hf"].generate(reqs, GREEDY)]
    cols = [list(r.prompt_ids).index(setup["marker"].token_id) for r in reqs]
    expected = teacher_forced_logprobs(learner, [r.prompt_ids for r in reqs], completions,
                                       torch.stack([r.vector for r in reqs]), cols, SPEC)
    state = learner.state_dict()
    pool = setup["pool"]
    pool.sync_weights(state.items(), bucket_bytes=1)
    assert len(pool._weights_refs) == setup["model"].config.num_hidden_layers + 1  # + embeddings/norm
    assert pool.verify_sync(expected, (reqs, completions), tol=1e-4) < 1e-4
    kept = {name: unpack_tensor(*packed) for bucket in ray.get(pool._weights_refs)
            for name, *packed in bucket}
    assert kept.keys() == state.keys()
    assert all(torch.equal(kept[name], tensor) for name, tensor in state.items())
    assert set(pool.last_sync) == {"put_s", "fetch_s", "load_s"}


def test_pool_from_recipe_hosts_the_configured_engine(setup, tmp_path):
    """The recipe's engine section picks the engine: here ``hf`` in one actor, same greedy output."""
    from actors.rollout import pool_from_recipe
    from nla_rl.config import recipe_from_dict

    cfg = recipe_from_dict({}, ["engine.kind=hf", "engine.num_engines=1"])
    hf = setup["hf"]
    pool = pool_from_recipe(cfg, model_dir=hf.model_dir, marker=setup["marker"], injection=SPEC,
                            num_cpus_per_engine=0.5)
    try:
        reqs = setup["requests"][:2]
        assert [g[0].token_ids for g in pool.generate(reqs, GREEDY)] == \
            [g[0].token_ids for g in hf.generate(reqs, GREEDY)]
        assert pool.health()[0]["kind"] == "hf"
    finally:
        pool.shutdown()
