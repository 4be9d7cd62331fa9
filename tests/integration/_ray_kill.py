"""Kill a Ray actor and wait until the driver knows it is dead.

``ray.kill`` is asynchronous: it goes through the GCS, while actor calls go straight from the
driver to the actor's worker. A fast call submitted right after the kill (a few logprobs on a
tiny model) can finish on the doomed actor before the kill lands, so a test that kills an actor
to exercise recovery must wait until a call to it fails.
"""

from __future__ import annotations

import time

import ray


def kill_and_wait(actor, timeout_s: float = 30.0) -> None:
    """``ray.kill(actor, no_restart=True)``, then return once a call to it raises
    ``RayActorError`` (the driver then fails every later call to it at once)."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"actor {actor} still answered {timeout_s:g}s after ray.kill")
