"""A stop request (SIGTERM) ends a run the way an error does: every cleanup runs."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside this context SIGTERM raises ``SystemExit(143)`` in the main thread.

    ``ray job stop``, Slurm's ``scancel`` and Kubernetes stop a driver with SIGTERM, whose default
    action ends Python without running ``finally`` blocks or context exits: the learner and engine
    actors, the W&B run (left "running") and the log redirections would outlive the driver. As an
    exception, the stop unwinds through all of them. A second SIGTERM during that cleanup ends the
    process at once, as the default would. Outside the main thread (where Python cannot install a
    handler) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second request is not delayed
        print(f"stopping: {signal.Signals(signum).name} received; shutting down actors and "
              "trackers (send it again to end at once)", file=sys.stderr, flush=True)
        raise SystemExit(STOPPED_EXIT_CODE)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
