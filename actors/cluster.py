"""Connecting to Ray: join the cluster a job runs in, or start a private local one.

Security defaults: token authentication stays on (Ray 2.60 generates a token for new local
clusters) and a locally started cluster runs no dashboard, so nothing listens beyond what Ray's
core needs.
"""

from __future__ import annotations

import os


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
