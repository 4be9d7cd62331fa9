"""Placement of learner groups and engines on Ray placement groups, and the rendezvous.

``learner.placement: separate`` — every rank of a group reserves ``num_cpus_per_rank`` CPUs and
``num_gpus_per_rank`` GPUs in one bundle of the group's own placement group, so a group either
starts whole or waits whole (no half-placed group holding resources another group needs); the
engines are plain actors. ``colocated`` — one placement group for the whole RL world, where
bundle i hosts engine i, AV rank i and AR rank i (:func:`reserve_colocated`): each member keeps
its CPUs and takes a third of the bundle's GPU, so the three share one device. ``PACK`` keeps
the bundles on as few nodes as possible, which is what NCCL/gloo want; rank 0 picks a free port
on its own node for the rendezvous. Multi-node is the same code on a bigger Ray cluster; a
bundle (or an engine) that no single node can hold is refused before Ray is asked
(:func:`check_nodes_hold`), since a bundle never spans nodes.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from nla_rl.errors import NLAError

PLACEMENT_TIMEOUT_S = 120.0


class PlacementError(NLAError):
    """The cluster cannot hold the learner group as configured."""


def free_port() -> int:
    """A TCP port free on this node right now (the OS picks it; released before returning)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def node_address() -> str:
    """This node's address as Ray sees it (what the other ranks can reach)."""
    import ray

    return ray.util.get_node_ip_address()


def actor_placement() -> dict:
    """Where the calling actor runs: its node, its placement group (None outside one) and the
    resources Ray assigned it — for health reports and placement checks."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "placement_group": context.get_placement_group_id(),
            "resources": context.get_assigned_resources()}


def rank_bundles(world_size: int, *, num_cpus: float, num_gpus: float) -> list[dict]:
    """One resource bundle per rank (zero-sized resources left out: Ray rejects empty bundles)."""
    if world_size < 1:
        raise PlacementError(f"a learner group needs ≥ 1 rank, found {world_size}")
    bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    return [dict(bundle) or {"CPU": 0.01} for _ in range(world_size)]


def reserve(world_size: int, *, num_cpus: float, num_gpus: float,
            timeout_s: float = PLACEMENT_TIMEOUT_S):
    """A ready placement group with one bundle per rank, or a clear error naming what is missing."""
    bundles = rank_bundles(world_size, num_cpus=num_cpus, num_gpus=num_gpus)
    return _reserve(bundles, timeout_s, f"{world_size} learner ranks of {bundles[0]}",
                    "learner.num_cpus_per_rank / num_gpus_per_rank or the number of ranks")


def _reserve(bundles: list[dict], timeout_s: float, what: str, fix: str):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_nodes_hold(bundles, what=what, fix=fix)  # Ray would wait the whole timeout first
    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not place {what} within {timeout_s:.0f}s (available: "
            f"{ray.available_resources()}); lower {fix}, or start a bigger cluster")
    return group


# A node as the checks below see it: a name for messages and its total resources.
Node = tuple[str, dict]


def alive_nodes() -> list[Node]:
    """Every alive node of the connected Ray cluster: ``("<id prefix> (<address>)", total
    resources)``. Totals, not what is free now: the checks ask what a node could ever hold."""
    import ray

    return [(f"{n['NodeID'][:8]} ({n['NodeManagerAddress']})", dict(n["Resources"]))
            for n in ray.nodes() if n.get("Alive")]


def _amounts(resources: dict, keys) -> str:
    return " + ".join(f"{resources.get(k, 0.0):g} {k}" for k in keys)


def _node_holds(bundle: dict, have: dict) -> bool:
    return all(need <= have.get(key, 0.0) + 1e-9 for key, need in bundle.items())


def check_nodes_hold(bundles: Sequence[dict], *, what: str, fix: str,
                     nodes: Sequence[Node] | None = None) -> None:
    """Raise :class:`PlacementError` at once when a bundle fits on no single node, or the
    bundles need more than all nodes together: a bundle never spans nodes, so Ray would keep
    it pending (until a placement timeout, or forever for a plain actor) though the cluster's
    total looks big enough. Names what one bundle needs and what each node has.

    Both are necessary conditions only (packing several bundles per node is Ray's problem), so
    a placement that could fit is never refused. ``nodes``: default :func:`alive_nodes`; an
    autoscaling cluster is judged by the nodes it has now."""
    nodes = alive_nodes() if nodes is None else list(nodes)
    for bundle in {tuple(sorted(b.items())): b for b in bundles}.values():
        if any(_node_holds(bundle, have) for _, have in nodes):
            continue
        keys = sorted(bundle)
        per_node = "; ".join(f"node {name}: {_amounts(have, keys)}" for name, have in nodes)
        raise PlacementError(
            f"{what}: one bundle needs {_amounts(bundle, keys)} on a single node, and no node of "
            f"the Ray cluster has that much (a bundle never spans nodes). Per node: {per_node}. "
            f"Lower {fix}, or add a node with at least {_amounts(bundle, keys)}")
    keys = {k for b in bundles for k in b}
    total_need = {k: sum(b.get(k, 0.0) for b in bundles) for k in keys}
    total_have = {k: sum(have.get(k, 0.0) for _, have in nodes) for k in total_need}
    short = [k for k in sorted(total_need) if total_need[k] > total_have[k] + 1e-9]
    if short:
        raise PlacementError(
            f"{what}: {len(bundles)} bundles need {_amounts(total_need, short)} in all, the "
            f"Ray cluster's {len(nodes)} node(s) have {_amounts(total_have, short)}. Lower "
            f"{fix}, or add nodes")


# Ray counts resources in units of 1e-4; a share rounded up could overfill its bundle.
_RESOURCE_UNIT = 1e-4
COLOCATED_MEMBERS = 3  # engine i, AV rank i and AR rank i


def share_of(amount: float, parts: int) -> float:
    """``amount / parts`` rounded down to Ray's resource unit, so ``parts`` shares always fit."""
    return math.floor(amount / parts / _RESOURCE_UNIT) * _RESOURCE_UNIT


@dataclass(frozen=True)
class Colocated:
    """A placement group whose bundle i hosts engine i, AV rank i and AR rank i.

    ``num_cpus``/``num_gpus`` are what *each member* asks of its bundle: its own CPUs, and a
    third of the bundle's GPUs (Ray's bookkeeping only: how the device memory is split is up to
    ``engine.gpu_memory_utilization`` and the learners).
    """

    group: Any
    num_cpus: float
    num_gpus: float

    def bundles(self, count: int) -> list[int]:
        """The bundles of the first ``count`` members of one kind (engines, AV or AR ranks)."""
        return list(range(count))

    def shutdown(self) -> None:
        """Release the group (this also ends any actor still in it)."""
        release(self.group)


def colocated_slots(num_engines: int, ranks_av: int, ranks_ar: int) -> list[int]:
    """Members of each colocated bundle: bundle i holds engine i, AV rank i and AR rank i, where
    they exist."""
    count = max(ranks_av, ranks_ar, num_engines)
    return [(i < num_engines) + (i < ranks_av) + (i < ranks_ar) for i in range(count)]


def colocated_bundles(slots: Sequence[int], *, num_cpus: float, num_gpus: float) -> list[dict]:
    """Bundle i holds ``slots[i]`` members' CPUs (``num_cpus`` each) and ``num_gpus`` GPUs."""
    bundles = []
    for members in slots:
        bundle = {"CPU": round(num_cpus * members, 4), "GPU": num_gpus}
        bundles.append({k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01})
    return bundles


def reserve_colocated(*, num_engines: int, ranks_av: int, ranks_ar: int, num_cpus: float,
                      num_gpus: float, timeout_s: float = PLACEMENT_TIMEOUT_S) -> Colocated:
    """One ready placement group of ``max(ranks_av, ranks_ar, num_engines)`` bundles for the
    colocated world; ``num_cpus`` per member, ``num_gpus`` per bundle (shared by its members)."""
    count = max(ranks_av, ranks_ar, num_engines)
    bundles = colocated_bundles(colocated_slots(num_engines, ranks_av, ranks_ar),
                                num_cpus=num_cpus, num_gpus=num_gpus)
    group = _reserve(bundles, timeout_s, f"{count} colocated bundles (engine + AV rank + AR "
                     f"rank each, the first {bundles[0]})",
                     "learner.num_cpus_per_rank / num_gpus_per_rank or the number of ranks")
    return Colocated(group, num_cpus, share_of(num_gpus, COLOCATED_MEMBERS))


def colocated_for_recipe(cfg) -> Colocated | None:
    """The recipe's shared placement group (``learner.placement: colocated``), else None."""
    if cfg.learner.placement != "colocated":
        return None
    return reserve_colocated(num_engines=cfg.engine.num_engines, ranks_av=cfg.learner.ranks_av,
                             ranks_ar=cfg.learner.ranks_ar,
                             num_cpus=cfg.learner.num_cpus_per_rank,
                             num_gpus=cfg.learner.num_gpus_per_rank)


def check_bundles_hold(group, bundle_indices: Sequence[int], *, count: int, num_cpus: float,
                       num_gpus: float, what: str) -> list[int]:
    """``bundle_indices`` as a list, after checking there is one per actor, each exists and each
    could hold one actor of ``num_cpus``/``num_gpus`` (Ray would queue it forever otherwise)."""
    indices = list(bundle_indices)
    if len(indices) != count:
        raise PlacementError(f"{what}: {count} actors need {count} bundle indices, found {indices}")
    specs = group.bundle_specs
    for index in indices:
        if not 0 <= index < len(specs):
            raise PlacementError(f"{what}: bundle {index} does not exist (the placement group "
                                 f"has {len(specs)} bundles)")
        for key, need in (("CPU", num_cpus), ("GPU", num_gpus)):
            if need > specs[index].get(key, 0.0) + 1e-9:
                raise PlacementError(
                    f"{what}: an actor asks for {need:g} {key}, bundle {index} holds only "
                    f"{specs[index]}; lower the per-actor share or reserve bigger bundles")
    return indices


def release(group) -> None:
    """Give a placement group's resources back (safe to call twice)."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # already removed, or Ray is shutting down: nothing left to free
        pass
