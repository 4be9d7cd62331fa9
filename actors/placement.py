"""Placement of a learner group: one Ray placement-group bundle per rank, and the rendezvous.

Every rank of a group reserves ``num_cpus_per_rank`` CPUs and ``num_gpus_per_rank`` GPUs in one
bundle of a placement group, so a group either starts whole or waits whole (no half-placed group
holding resources another group needs). ``PACK`` keeps the ranks on as few nodes as possible,
which is what NCCL/gloo want; rank 0 picks a free port on its own node for the rendezvous.
"""

from __future__ import annotations

import socket

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


def rank_bundles(world_size: int, *, num_cpus: float, num_gpus: float) -> list[dict]:
    """One resource bundle per rank (zero-sized resources left out: Ray rejects empty bundles)."""
    if world_size < 1:
        raise PlacementError(f"a learner group needs ≥ 1 rank, found {world_size}")
    bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    return [dict(bundle) or {"CPU": 0.01} for _ in range(world_size)]


def reserve(world_size: int, *, num_cpus: float, num_gpus: float,
            timeout_s: float = PLACEMENT_TIMEOUT_S):
    """A ready placement group with one bundle per rank, or a clear error naming what is missing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = rank_bundles(world_size, num_cpus=num_cpus, num_gpus=num_gpus)
    group = placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not place {world_size} learner ranks of {bundles[0]} within "
            f"{timeout_s:.0f}s (available: {ray.available_resources()}); lower "
            "learner.num_cpus_per_rank / num_gpus_per_rank or the number of ranks")
    return group


def release(group) -> None:
    """Give a placement group's resources back (safe to call twice)."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(group)
    except Exception:  # already removed, or Ray is shutting down: nothing left to free
        pass
