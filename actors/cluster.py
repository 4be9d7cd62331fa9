"""Connecting to Ray: join the cluster a job runs in, or start a private local one.

Security defaults: token authentication stays on (Ray 2.60 generates a token for new local
clusters) and a locally started cluster runs no dashboard, so nothing listens beyond what Ray's
core needs.
"""

from __future__ import annotations

import os


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
    """
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return ray
