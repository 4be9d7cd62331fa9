"""Colocated placement: the recipe's rules and the bundles it reserves (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.placement import (COLOCATED_MEMBERS, PlacementError, check_nodes_hold,
                              colocated_bundles, rank_bundles, share_of)
from nla_rl.config import load_recipe
from nla_rl.errors import ConfigError

TINY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def test_separate_is_the_default_and_colocated_loads():
    assert load_recipe(TINY_RECIPE).learner.placement == "separate"
    cfg = load_recipe(TINY_RECIPE, ["learner.placement=colocated"])
    assert cfg.learner.placement == "colocated"


@pytest.mark.parametrize("overrides", [
    ["learner.ranks_av=2", "learner.ranks_ar=1"],
    ["learner.ranks_av=1", "learner.ranks_ar=1", "engine.num_engines=2"],
    ["engine.tensor_parallel_size=2"],
])
def test_colocated_needs_one_engine_av_and_ar_rank_per_bundle(overrides):
    with pytest.raises(ConfigError, match=r"learner\.placement: colocated .* needs learner\.ranks_av "
                       r"== learner\.ranks_ar >= engine\.num_engines .* set learner\.placement=separate"):
        load_recipe(TINY_RECIPE, ["learner.placement=colocated", *overrides])
    load_recipe(TINY_RECIPE, ["learner.placement=separate", *overrides])  # fine when separate


def test_shares_never_overfill_a_bundle():
    for amount in (1.0, 0.5, 2.0, 0.01, 8.0):
        share = share_of(amount, COLOCATED_MEMBERS)
        assert 0 < share <= amount / COLOCATED_MEMBERS
        assert round(share * 1e4) * COLOCATED_MEMBERS <= round(amount * 1e4)  # Ray's fixed point
    assert share_of(0.0, COLOCATED_MEMBERS) == 0.0


def test_colocated_bundles_hold_their_members():
    # 1 engine, 2 AV and 2 AR ranks: bundle 0 hosts three members, bundle 1 two.
    assert colocated_bundles([3, 2], num_cpus=0.5, num_gpus=1.0) == [
        {"CPU": 1.5, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert colocated_bundles([3], num_cpus=0.5, num_gpus=0.0) == [{"CPU": 1.5}]  # CPU only
    assert colocated_bundles([3], num_cpus=0.0, num_gpus=0.0) == rank_bundles(1, num_cpus=0, num_gpus=0)


# Two nodes as Ray lists them (total resources), for the per-node checks below.
NODES = [("aaaa1111 (10.0.0.1)", {"CPU": 2.0, "GPU": 8.0, "memory": 1e9}),
         ("bbbb2222 (10.0.0.2)", {"CPU": 2.0, "GPU": 8.0})]


def test_a_bundle_no_single_node_holds_is_refused_naming_each_node():
    with pytest.raises(PlacementError) as err:
        check_nodes_hold([{"CPU": 3.0, "GPU": 1.0}] * 2, what="2 learner ranks", fix="the keys",
                         nodes=NODES)
    assert str(err.value) == (
        "2 learner ranks: one bundle needs 3 CPU + 1 GPU on a single node, and no node of the "
        "Ray cluster has that much (a bundle never spans nodes). Per node: node aaaa1111 "
        "(10.0.0.1): 2 CPU + 8 GPU; node bbbb2222 (10.0.0.2): 2 CPU + 8 GPU. Lower the keys, or "
        "add a node with at least 3 CPU + 1 GPU")


def test_bundles_beyond_the_nodes_total_are_refused_and_a_fitting_set_passes():
    with pytest.raises(PlacementError, match=r"^16 ranks: 17 bundles need 17 GPU in all, the Ray "
                       r"cluster's 2 node\(s\) have 16 GPU\. Lower the keys, or add nodes$"):
        check_nodes_hold([{"GPU": 1.0}] * 17, what="16 ranks", fix="the keys", nodes=NODES)
    # 2 × 8 GPUs: sixteen one-GPU bundles (colocated, the reference's layout) fit; so do
    # bundles of a whole node each; nothing is asked of Ray here.
    check_nodes_hold([{"CPU": 0.1, "GPU": 1.0}] * 16, what="x", fix="y", nodes=NODES)
    check_nodes_hold([{"CPU": 2.0, "GPU": 8.0}] * 2, what="x", fix="y", nodes=NODES)
