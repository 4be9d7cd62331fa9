"""Multi-node, simulated: one machine, a Ray cluster of several nodes (``ray.cluster_utils``).

The head node holds no CPUs (only the driver connects there); three worker nodes of one
logical CPU each are labelled ``nla-rl-test/node=n1..n3`` (a test that removes one gets it back
before the next test). One CPU per node is what makes placement observable: a learner group of
2 × 0.5 CPU fills a node, an engine of 1 CPU fills another, a colocated bundle of 3 × 0.33 CPU
fills one, so where each actor must land is decided by the sizes, not by the scheduler's mood.
Nodes are over-declared logical CPUs on a 2-core machine; every actor runs one thread on tiny
models (``hf`` engine).

What is proved: ``separate`` placement runs engines and learner ranks on different nodes and a
weight sync across them verifies; ``colocated`` bundle i keeps engine i and rank i on one node;
a removed node costs an engine a replacement on a surviving node (same results), a learner
rank one clear error; a bundle no single node can hold fails at once.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from actors.backends import OptimSpec
from actors.coordinator import sync_engines
from actors.learner import LearnerGroup, LearnerLostError, LearnerSpec
from actors.learner_models import ModelSpec
from actors.placement import PlacementError, reserve, reserve_colocated
from actors.rollout import RolloutPool
from nla_rl.templates import DEFAULT_AV_TEMPLATE
from rollout.base import EngineSpec, SamplingSpec, WeightSyncError
from tests.integration._engine_setup import INJECTIONS, build_model, make_requests, marker_of

LABEL = "nla-rl-test/node"
SAMPLED = SamplingSpec(n=2, temperature=1.0, max_new_tokens=4, seed=7)
# A large learning rate: one step moves the weights far enough that an unsynced engine fails
# the verification (so its passing after the sync means the weights arrived).
OPTIM = OptimSpec(lr=5e-2, weight_decay=0.0, warmup_steps=0, total_steps=4, schedule="constant",
                  grad_clip=1.0)


WORKERS = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster whose head has no CPUs; the worker nodes come from :func:`nodes`."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a module before this one left its local Ray up
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, labels={LABEL: "head"}))
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def node_names() -> dict[str, str]:
    """Alive node id → the test's name for that node (its label)."""
    import ray

    return {n["NodeID"]: n.get("Labels", {}).get(LABEL, "?") for n in ray.nodes() if n["Alive"]}


@pytest.fixture
def nodes(cluster) -> dict:
    """Worker nodes n1..n3 of 1 CPU each, {name: Ray node}; one an earlier test removed is
    added again (a fresh node under the same name)."""
    missing = set(WORKERS) - set(node_names().values())
    for name in sorted(missing):
        cluster.add_node(num_cpus=1, labels={LABEL: name})
    if missing:
        cluster.wait_for_nodes()
    ids = {name: node_id for node_id, name in node_names().items()}
    return {name: next(n for n in cluster.worker_nodes if n.node_id == ids[name])
            for name in WORKERS}


def where(placements: list[dict]) -> list[str]:
    """The node names of actors, from their ``placement`` reports (engine health, rank placements)."""
    names = node_names()
    return [names.get(p["node_id"], "gone") for p in placements]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny AV (hidden 64): the learners train it, the engines serve it."""
    root = tmp_path_factory.mktemp("multinode_models")
    model, tok = build_model(root / "av", seed=11)
    marker = marker_of(tok)
    return SimpleNamespace(root=root, tok=tok, marker=marker, d=model.config.hidden_size,
                           requests=make_requests(tok, marker, model.config.hidden_size))


def engine_spec(models) -> EngineSpec:
    return EngineSpec.from_kwargs("hf", model_dir=str(models.root / "av"), marker=models.marker,
                                  injection=INJECTIONS["replace"])


def av_spec(models) -> LearnerSpec:
    """The AV learner, with the engines' marker and injection (so their log-probs compare)."""
    model = ModelSpec(role="av", model_dir=str(models.root / "av"), marker=models.marker,
                      av_template=DEFAULT_AV_TEMPLATE, injection=INJECTIONS["replace"])
    return LearnerSpec(model=model, optim=OPTIM, micro_batch_size=2)


def sft_rows(d: int) -> dict:
    vectors = torch.randn(4, d, generator=torch.Generator().manual_seed(0)).numpy()
    return {"explanations": ["the cat sat", "a red dog", "blue sea", "words"], "vectors": vectors}


def token_ids(groups) -> list:
    return [[s.token_ids for s in group] for group in groups]


def shutdown_all(started: list) -> None:
    for actor in reversed(started):
        actor.shutdown()


def test_separate_placement_spans_nodes_syncs_and_survives_lost_nodes(cluster, nodes, models,
                                                                     capfd):
    started = []
    try:
        policy = LearnerGroup(av_spec(models), world_size=2, num_cpus_per_rank=0.5,
                              name="rl_av")  # its own PACK group: 2 × 0.5 CPU fill one node
        started.append(policy)
        pool = RolloutPool(engine_spec(models), num_engines=1, num_cpus_per_engine=1.0)
        started.append(pool)
        [learner_node, other_rank_node] = where(policy.placements())
        [engine_node] = where([h["placement"] for h in pool.health()])
        assert learner_node == other_rank_node and engine_node != learner_node, \
            (learner_node, other_rank_node, engine_node)

        # A weight sync across nodes, verified: the unsynced engine fails the probe.
        assert policy.train_step(sft_rows(models.d), loss="av_sft")["count"] > 0
        probe = (models.requests[:2], [[5, 6, 7], [8, 9]])
        expected = [e.tolist() for e in policy.av_logprobs(
            [list(r.prompt_ids) for r in probe[0]], probe[1],
            np.stack([r.vector.numpy() for r in probe[0]]))]
        with pytest.raises(WeightSyncError):
            pool.verify_sync(expected, probe, 2e-3)
        world = SimpleNamespace(policy=policy, engines=pool, probe=probe, sync_tolerance=2e-3,
                                sync_seconds=[])  # what the coordinator's sync reads
        assert sync_engines(world, verify=True)["health/sync_logp_delta"] < 2e-3
        synced = token_ids(pool.generate(models.requests, SAMPLED))

        # The engine's node goes: the engine is replaced on the free node, with the synced
        # weights, and the call returns what the lost engine would have.
        cluster.remove_node(nodes[engine_node])
        assert token_ids(pool.generate(models.requests, SAMPLED)) == synced
        [event] = pool.drain_replacements()
        assert (event.engine, event.method) == (0, "generate")
        [new_node] = where([h["placement"] for h in pool.health()])
        assert new_node not in (engine_node, learner_node, "gone"), new_node
        assert pool.verify_sync(expected, probe, 2e-3) < 2e-3

        # The learners' node goes: one error naming the group, the rank and the phase.
        cluster.remove_node(nodes[learner_node])
        with pytest.raises(LearnerLostError, match=r"learner rl_av: rank [01] of 2 was lost "
                           r"during av step: its node died; the run is stopped\. Last "
                           r"completed checkpoint: none .*run\.resume=true"):
            policy.train_step(sft_rows(models.d), loss="av_sft")
        assert policy.ranks == []  # the surviving ranks (if any) were stopped too
    finally:
        shutdown_all(started)
    assert capfd.readouterr().out.count("engine actor 0 lost") == 1


def test_colocated_bundles_each_stay_on_one_node(nodes, models):
    # Bundle = engine + AV rank + AR rank, 3 × 0.33 CPU: no two bundles fit one node. The AR's
    # ranks take the bundles the same way as the AV's (tests/integration/test_placement_colocated.py
    # holds all three); left out here, as a third group would only add start-up time.
    colocated = reserve_colocated(num_engines=2, ranks_av=2, ranks_ar=2, num_cpus=0.33,
                                  num_gpus=0.0)
    started = [colocated]
    try:
        bundles = colocated.bundles(2)
        pool = RolloutPool(engine_spec(models), num_engines=2, num_cpus_per_engine=colocated.num_cpus,
                           placement_group=colocated.group, bundle_indices=bundles)
        started.append(pool)
        policy = LearnerGroup(av_spec(models), world_size=2,
                              num_cpus_per_rank=colocated.num_cpus, name="coloc_av",
                              placement_group=colocated.group, bundle_indices=bundles)
        started.append(policy)
        engines = where([h["placement"] for h in pool.health()])
        ranks = where(policy.placements())
        assert engines == ranks, (engines, ranks)  # bundle i: engine i and rank i, one node
        assert len(set(engines)) == 2 and set(engines) <= set(nodes), engines  # two nodes
        assert policy.train_step(sft_rows(models.d), loss="av_sft")["count"] > 0  # gloo across them
        assert len(pool.generate(models.requests, SAMPLED)) == len(models.requests)
    finally:
        shutdown_all(started)


def node_cpus_named(message: str) -> list[str]:
    """The CPUs of each node as a placement error lists them ("node <id> (<address>): 1 CPU")."""
    return sorted(re.findall(r"node \w+ \([^)]*\): ([\d.]+) CPU", message))


def test_a_bundle_no_single_node_holds_fails_at_once_with_each_nodes_cpus(nodes, models):
    started = time.perf_counter()  # 3 CPUs in all, 1 per worker node
    with pytest.raises(PlacementError, match=r"one bundle needs 1\.5 CPU on a single node.*"
                       r"Lower learner\.num_cpus_per_rank.*add a node with at least 1\.5 CPU"
                       ) as err:
        reserve(1, num_cpus=1.5, num_gpus=0.0)
    assert node_cpus_named(str(err.value)) == ["0", "1", "1", "1"]  # the head and the workers
    with pytest.raises(PlacementError, match=r"colocated bundles.* one bundle needs 1\.5 CPU"):
        reserve_colocated(num_engines=1, ranks_av=1, ranks_ar=1, num_cpus=0.5, num_gpus=0.0)
    with pytest.raises(PlacementError, match=r"rollout engines .*needs 1\.5 CPU") as err:
        RolloutPool(engine_spec(models), num_engines=1, num_cpus_per_engine=1.5)
    assert node_cpus_named(str(err.value)) == ["0", "1", "1", "1"]
    with pytest.raises(PlacementError, match=r"4 bundles need 4 CPU in all.*have 3 CPU"):
        reserve(4, num_cpus=1.0, num_gpus=0.0)
    assert time.perf_counter() - started < 5.0  # not PLACEMENT_TIMEOUT_S (120 s)
