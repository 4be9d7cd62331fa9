"""Colocated placement: engine i, AV rank i and AR rank i share bundle i of one placement group.

Real Ray actors: two ``hf`` engines and two 2-rank FSDP2 learner groups (tiny models) in one
group of two bundles. Bundle membership is read from Ray's own accounting of each bundle's
free CPUs (``CPU_group_<i>_<group id>``), which only actors scheduled into bundle i consume,
and each actor reports the placement group it runs in.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from actors.backends import OptimSpec
from actors.learner import LearnerGroup, LearnerSpec
from actors.learner_models import ModelSpec
from actors.placement import PlacementError, reserve_colocated
from actors.rollout import RolloutPool
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sidecar import make_token_meta
from nla_rl.templates import DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE
from rollout.base import EngineSpec, SamplingSpec
from tests.integration._engine_setup import INJECTIONS, build_model, make_requests, marker_of
from tests.integration._ray_kill import kill_and_wait

RANKS, CPUS = 2, 0.5  # 2 bundles of 3 members × 0.5 CPU
OPTIM = OptimSpec(lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=4, schedule="constant",
                  grad_clip=1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("colocated_models")
    model, tok = build_model(root / "av", seed=5)
    ActivationReconstructor.from_base(root / "av", 1).save_pretrained(root / "ar", tok)
    return root, tok, model.config.hidden_size


def specs(root, tok) -> dict[str, LearnerSpec]:
    marker = make_token_meta(tok, DEFAULT_AV_TEMPLATE, None).marker
    av = ModelSpec(role="av", model_dir=str(root / "av"), marker=marker,
                   av_template=DEFAULT_AV_TEMPLATE, injection=InjectionSpec("replace", 4.0))
    ar = ModelSpec(role="ar", model_dir=str(root / "ar"), ar_template=DEFAULT_AR_TEMPLATE,
                   mse_scale=8.0)
    return {role: LearnerSpec(model=m, optim=OPTIM, micro_batch_size=2)
            for role, m in (("av", av), ("ar", ar))}


def bundle_free_cpus(ray, group, expected: list[float], wait_s: float = 10.0) -> list[float]:
    """Each bundle's free CPUs, read until they equal ``expected`` (Ray's resource view is
    refreshed asynchronously) or ``wait_s`` passed; the caller asserts on what it returns."""
    keys = [f"CPU_group_{i}_{group.id.hex()}" for i in range(group.bundle_count)]
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        got = [round(free.get(k, 0.0), 4) for k in keys]
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def rows(d: int) -> dict:
    texts = ["the cat sat", "a red dog", "blue sea and rain", "numbers and words"]
    vectors = torch.randn(4, d, generator=torch.Generator().manual_seed(0)).numpy()
    return {"explanations": texts, "vectors": vectors}


def test_engine_av_and_ar_rank_share_each_bundle(ray_cluster, models, capfd):
    root, tok, d = models
    colocated = reserve_colocated(num_engines=RANKS, ranks_av=RANKS, ranks_ar=RANKS,
                                  num_cpus=CPUS, num_gpus=0.0)
    group, pg_id = colocated.group, colocated.group.id.hex()
    assert colocated.group.bundle_specs == [{"CPU": 3 * CPUS}] * RANKS  # CPU only: no GPU here
    started = []
    try:
        kwargs = dict(model_dir=str(root / "av"), marker=marker_of(tok), injection=INJECTIONS["replace"])
        pool = RolloutPool(EngineSpec.from_kwargs("hf", **kwargs),
                           num_engines=RANKS, num_cpus_per_engine=colocated.num_cpus,
                           placement_group=group, bundle_indices=colocated.bundles(RANKS))
        started.append(pool)
        assert bundle_free_cpus(ray_cluster, group, [2 * CPUS] * RANKS) == [2 * CPUS] * RANKS
        learners = {}
        for role, spec in specs(root, tok).items():
            learners[role] = LearnerGroup(spec, world_size=RANKS, num_cpus_per_rank=colocated.num_cpus,
                                          name=f"coloc_{role}", placement_group=group,
                                          bundle_indices=colocated.bundles(RANKS))
            started.append(learners[role])
        # One engine, one AV rank and one AR rank in each bundle: every bundle exactly full.
        assert bundle_free_cpus(ray_cluster, group, [0.0] * RANKS) == [0.0] * RANKS
        where = [h["placement"] for h in pool.health()]
        where += [p for g in learners.values() for p in g.placements()]
        assert [w["placement_group"] for w in where] == [pg_id] * 3 * RANKS
        assert all(w["resources"] == {"CPU": CPUS} for w in where)

        samples = pool.generate(make_requests(tok, marker_of(tok), d)[:4],
                                SamplingSpec(n=2, temperature=1.0, max_new_tokens=4, seed=1))
        assert [len(s) for s in samples] == [2] * 4 and all(x.token_ids for s in samples for x in s)
        for role, loss in (("av", "av_sft"), ("ar", "ar_sft")):
            stats = learners[role].train_step(rows(d), loss=loss)
            assert stats["count"] > 0 and np.isfinite(stats["loss"]) and not stats["skipped"]

        # A lost engine is replaced in its own bundle (there is no room in the other one, and
        # outside the group bundle 1 would show its CPUs free).
        kill_and_wait(pool.actors[1])
        pool.generate(make_requests(tok, marker_of(tok), d)[:4], SamplingSpec(n=1, max_new_tokens=2))
        assert pool.health()[1]["placement"]["placement_group"] == pg_id
        assert bundle_free_cpus(ray_cluster, group, [0.0] * RANKS) == [0.0] * RANKS

        # A learner group leaves the shared group to its owner.
        learners["av"].shutdown()
        assert ray_cluster.util.placement_group_table(group)["state"] == "CREATED"
        assert bundle_free_cpus(ray_cluster, group, [CPUS] * RANKS) == [CPUS] * RANKS
    finally:
        for actor in started:
            actor.shutdown()
        colocated.shutdown()
    assert ray_cluster.util.placement_group_table(group)["state"] == "REMOVED"
    assert capfd.readouterr().out.count("engine actor 1 lost") == 1


def test_actors_that_do_not_fit_their_bundle_fail_at_once(ray_cluster, models):
    root, tok, _ = models
    colocated = reserve_colocated(num_engines=1, ranks_av=2, ranks_ar=2, num_cpus=CPUS, num_gpus=0.0)
    try:
        assert colocated.group.bundle_specs == [{"CPU": 3 * CPUS}, {"CPU": 2 * CPUS}]
        kwargs = dict(model_dir=str(root / "av"), marker=marker_of(tok), injection=INJECTIONS["replace"])
        with pytest.raises(PlacementError, match=r"asks for 2 CPU, bundle 0 holds only"):
            RolloutPool(EngineSpec.from_kwargs("hf", **kwargs),
                        num_engines=1, num_cpus_per_engine=2.0,
                        placement_group=colocated.group)
        with pytest.raises(PlacementError, match=r"bundle 2 does not exist.*has 2 bundles"):
            LearnerGroup(specs(root, tok)["ar"], world_size=2, num_cpus_per_rank=CPUS,
                         placement_group=colocated.group, bundle_indices=[1, 2])
        with pytest.raises(PlacementError, match=r"2 actors need 2 bundle indices"):
            RolloutPool(EngineSpec.from_kwargs("hf", **kwargs),
                        num_engines=2, num_cpus_per_engine=CPUS,
                        placement_group=colocated.group, bundle_indices=[0])
    finally:
        colocated.shutdown()


def test_a_group_the_cluster_cannot_hold_fails_with_the_keys_to_change(ray_cluster):
    cpus = ray_cluster.cluster_resources()["CPU"]
    with pytest.raises(PlacementError, match=r"colocated bundles.*learner\.num_cpus_per_rank"):
        reserve_colocated(num_engines=1, ranks_av=1, ranks_ar=1, num_cpus=cpus, num_gpus=0.0,
                          timeout_s=2.0)
