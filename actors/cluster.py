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


def recipe_cpus(cfg) -> int:
    """Logical CPUs a local cluster needs for every stage of ``cfg`` (the first stage to start
    Ray sizes it for the whole pipeline: extraction workers, or engines plus both learner
    groups, whichever is larger). Logical CPUs may exceed the machine's cores."""
    import math

    extraction = cfg.data.workers * cfg.data.cpus_per_worker
    per_rank = cfg.learner.num_cpus_per_rank
    training = cfg.engine.num_engines * per_rank + (cfg.learner.ranks_av + cfg.learner.ranks_ar) * per_rank
    return max(2, math.ceil(max(extraction, training)))


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
