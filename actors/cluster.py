"""Connecting to Ray: join the cluster a job runs in, or start a private local one.

Security defaults: token authentication stays on (Ray 2.60 generates a token for new local
clusters) and a locally started cluster runs no dashboard, so nothing listens beyond what Ray's
core needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from nla_rl.errors import NLAError
from nla_rl.run_logs import RunLogs

EXISTING_CLUSTER = "the Ray cluster"  # available_resources(): joined, not started here
CONNECT_TIMEOUT_S = 10.0  # per host tried: a cluster's head answers at once or not at all


class RayConnectError(NLAError):
    """``RAY_ADDRESS`` names a Ray cluster that does not answer."""

_RUN_LOGS: RunLogs | None = None  # where actors started now send their output (None: console)


@contextmanager
def actor_logs(logs: RunLogs) -> Iterator[RunLogs]:
    """Actors started inside the block (engines, learner ranks, extraction workers) write their
    output to ``logs`` (:func:`nla_rl.run_logs.redirect_process_output`); set once per run by
    :func:`launch.train.run`, so the stages need not pass it along."""
    global _RUN_LOGS
    previous, _RUN_LOGS = _RUN_LOGS, logs
    try:
        yield logs
    finally:
        _RUN_LOGS = previous


def current_actor_logs() -> RunLogs | None:
    """The :class:`RunLogs` for actors started now (``None`` outside :func:`actor_logs`)."""
    return _RUN_LOGS


# What a stage reserves at once, per resource: the parts that add up to it, each
# (amount, how it is computed, the keys that lower it).
Part = tuple[float, str, str]


def _per_rank(counted: str, count: int, resource: str, cfg) -> Part:
    """``count`` actors (``counted``: the keys that count them) × the CPUs/GPUs of a rank."""
    key = f"learner.num_{resource.lower()}s_per_rank"
    amount = getattr(cfg.learner, f"num_{resource.lower()}s_per_rank")
    return (count * amount, f"{counted} = {count} × {key} {amount:g}", f"{counted} or {key}")


def stage_needs(cfg, *, gpu_engines: bool) -> dict[str, dict[str, list[Part]]]:
    """The CPUs and GPUs each Ray stage of ``cfg`` reserves at once, as the stages ask Ray for
    them (a stage's actors are shut down before the next starts, so a cluster must hold the
    largest stage, not the sum). ``gpu_engines``: engines take ``engine.tensor_parallel_size``
    GPUs each (when the driver sees CUDA, as :func:`actors.rollout.pool_from_recipe` decides)."""
    d, lc, e = cfg.data, cfg.learner, cfg.engine
    needs = {}
    if d.workers:  # 0: extraction in the driver, no Ray
        needs["datagen"] = {r: [(d.workers * per, f"data.workers {d.workers} × "
                                 f"data.{r.lower()}s_per_worker {per:g}",
                                 f"data.workers or data.{r.lower()}s_per_worker")]
                            for r, per in (("CPU", d.cpus_per_worker), ("GPU", d.gpus_per_worker))}
    for stage, key, ranks in (("ar_sft", "learner.ranks_ar", lc.ranks_ar),
                              ("av_sft", "learner.ranks_av", lc.ranks_av)):
        needs[stage] = {r: [_per_rank(key, ranks, r, cfg)] for r in ("CPU", "GPU")}
    members = e.num_engines + lc.ranks_av + lc.ranks_ar  # each engine asks a rank's CPUs
    rl = {"CPU": [_per_rank("engine.num_engines + learner.ranks_av + learner.ranks_ar", members,
                            "CPU", cfg)]}
    if lc.placement == "colocated":  # bundle i: engine i, AV rank i, AR rank i share its GPUs
        bundles = max(lc.ranks_av, lc.ranks_ar, e.num_engines)
        rl["GPU"] = [_per_rank("max(learner.ranks_av, learner.ranks_ar, engine.num_engines)",
                               bundles, "GPU", cfg)]
    else:
        tp = e.tensor_parallel_size if gpu_engines else 0
        rl["GPU"] = [_per_rank("learner.ranks_av + learner.ranks_ar", lc.ranks_av + lc.ranks_ar,
                               "GPU", cfg),
                     (e.num_engines * tp, f"engine.num_engines {e.num_engines} × "
                      f"engine.tensor_parallel_size {tp}",
                      "engine.num_engines or engine.tensor_parallel_size")]
    needs["rl"] = rl
    return needs


def recipe_cpus(cfg) -> int:
    """Logical CPUs a local cluster needs for every stage of ``cfg`` (the first stage to start
    Ray sizes it for the whole pipeline: extraction workers, or engines plus both learner
    groups, whichever is larger). Logical CPUs may exceed the machine's cores."""
    import math

    largest = max(sum(n for n, _, _ in need["CPU"])
                  for need in stage_needs(cfg, gpu_engines=False).values())
    return max(2, math.ceil(largest))


def stage_bundles(cfg, *, gpu_engines: bool) -> dict[str, tuple[list[dict], str]]:
    """Each Ray stage's bundles (one per actor, or per colocated slot), as the stages will ask
    Ray for them, and the keys that shrink them: what a node must hold, since a bundle never
    spans nodes (:func:`actors.placement.check_nodes_hold`)."""
    from actors.placement import colocated_bundles, colocated_slots, rank_bundles

    d, lc, e = cfg.data, cfg.learner, cfg.engine
    per_rank = "learner.num_cpus_per_rank / num_gpus_per_rank"
    out = {}
    if d.workers:
        worker = {k: v for k, v in (("CPU", d.cpus_per_worker), ("GPU", d.gpus_per_worker)) if v}
        out["datagen"] = ([worker or {"CPU": 0.01}] * d.workers,
                          "data.cpus_per_worker / gpus_per_worker")
    for stage, ranks in (("ar_sft", lc.ranks_ar), ("av_sft", lc.ranks_av)):
        out[stage] = (rank_bundles(ranks, num_cpus=lc.num_cpus_per_rank,
                                   num_gpus=lc.num_gpus_per_rank), per_rank)
    if lc.placement == "colocated":
        slots = colocated_slots(e.num_engines, lc.ranks_av, lc.ranks_ar)
        out["rl"] = (colocated_bundles(slots, num_cpus=lc.num_cpus_per_rank,
                                       num_gpus=lc.num_gpus_per_rank), per_rank)
    else:  # an engine asks a rank's CPUs and, on GPUs, its tensor-parallel GPUs
        tp = e.tensor_parallel_size if gpu_engines else 0
        out["rl"] = (rank_bundles(lc.ranks_av + lc.ranks_ar, num_cpus=lc.num_cpus_per_rank,
                                  num_gpus=lc.num_gpus_per_rank)
                     + rank_bundles(e.num_engines, num_cpus=lc.num_cpus_per_rank, num_gpus=tp),
                     f"{per_rank} or engine.tensor_parallel_size")
    return out


def check_nodes_fit(cfg, nodes, *, gpu_engines: bool) -> None:
    """Refuse now, before any stage runs, a stage whose bundle no node of an existing cluster
    can hold (``nodes``: :func:`actors.placement.alive_nodes`); the stage would otherwise find
    out only when it reserves them, after the earlier stages ran."""
    from actors.placement import check_nodes_hold

    for stage, (bundles, fix) in stage_bundles(cfg, gpu_engines=gpu_engines).items():
        if stage in cfg.run.stages:
            check_nodes_hold(bundles, what=f"{stage} stage", fix=fix, nodes=nodes)


def available_resources() -> tuple[dict[str, float], str]:
    """What the Ray stages will run on, and its name for messages: the Ray cluster this process
    is connected to or joins (``RAY_ADDRESS``: joining starts nothing), else this machine's GPUs.
    A local cluster gets as many logical CPUs as the recipe asks (:func:`recipe_cpus`; actors
    use one thread each), so CPUs limit only a cluster that already exists."""
    import sys

    ray = sys.modules.get("ray")  # imported by an earlier stage or test: maybe connected
    if os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        try:
            ray = connect_ray()
        except ConnectionError as err:
            from nla_rl.errors import ConfigError

            raise ConfigError(f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: no Ray cluster "
                              f"answers there ({err}); start it (ray start --head) or unset "
                              "RAY_ADDRESS to run on a local cluster") from None
        return {k: float(v) for k, v in ray.cluster_resources().items()}, EXISTING_CLUSTER
    import torch

    return {"GPU": float(torch.cuda.device_count())}, "this machine"


def check_cluster_size(cfg, have: dict[str, float], where: str) -> None:
    """Refuse now a recipe whose Ray stages need more CPUs/GPUs than ``have`` (a resource
    absent from ``have`` is not limited): Ray would otherwise queue the actors until a
    placement timeout, after the earlier stages had run. Says what is needed and what there is."""
    from nla_rl.errors import ConfigError

    needs = stage_needs(cfg, gpu_engines=have.get("GPU", 0.0) > 0)
    for stage in (s for s in cfg.run.stages if s in needs):
        for resource, parts in needs[stage].items():
            need = sum(n for n, _, _ in parts)
            if resource not in have or need <= have[resource] + 1e-9:
                continue
            how = " + ".join(h for n, h, _ in parts if n > 0)
            fixes = " or ".join(f for n, _, f in parts if n > 0)
            raise ConfigError(
                f"{stage}: needs {need:g} {resource} ({how}), {where} has "
                f"{have[resource]:g}; lower {fixes}, or run on a bigger cluster"
                + (" (ray start --num-cpus/--num-gpus, or more nodes)" if where != "this machine"
                   else ""))


def connect_ray(num_cpus: float | None = None):
    """Initialise Ray once per process and return the module.

    Under ``ray job submit`` (``RAY_ADDRESS`` set, or a driver already connected) the running
    cluster is joined; otherwise a local cluster with ``num_cpus`` logical CPUs is started (logical
    CPUs may exceed the cores: actors are sized fractionally and use one thread each).
    Inside :func:`actor_logs` (not verbose) actors write to the run's log files, so nothing of
    theirs is streamed to this console and Ray's INFO start-up lines are left out.
    """
    import logging

    import ray

    if ray.is_initialized():
        return ray
    logs = current_actor_logs()
    quiet = logs is not None and not logs.verbose
    options = dict(log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)  # Ray itself retries an unreachable head forever, silently
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
    return ray


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`RayConnectError` unless something accepts a connection at ``address``
    (``host:port`` or ``ray://host:port``; ``auto`` and ``local`` are Ray's to resolve) within
    ``timeout_s`` per host tried. A loopback host is also tried at this node's address, where
    Ray binds the head even when it is asked for 127.0.0.1."""
    target = address.split("://", 1)[-1]
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        return  # not host:port: Ray's own parser says what is wrong with it
    hosts = [host.strip("[]")]
    if hosts[0] in ("127.0.0.1", "localhost", "::1"):
        from ray.util import get_node_ip_address

        hosts.append(get_node_ip_address())
    failures = []
    for h in dict.fromkeys(hosts):
        try:
            with socket.create_connection((h, port_number), timeout=timeout_s):
                return
        except OSError as err:
            failures.append(f"{h}:{port_number} ({err.strerror or type(err).__name__})")
    raise RayConnectError(
        f"RAY_ADDRESS={address}: no Ray cluster answers there (tried {', '.join(failures)}). "
        "Start one with `ray start --head` and set RAY_ADDRESS to the address it prints (or "
        "auto), point RAY_ADDRESS at a running cluster's head (host:6379), or unset RAY_ADDRESS "
        "to run on a private local cluster")
