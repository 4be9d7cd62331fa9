"""Where a run's third-party output goes: ``<run>/logs/<kind>.log``, one file per process kind.

Every RL step used to print several vLLM INFO lines and an alarming (harmless) ``RotaryEmbedding:
Failed to load weights`` warning; the run's own state was lost among them. Unless
``run.verbose`` (``--verbose``) is on:

- each Ray actor sends its whole output (Python prints, library loggers, C/C++ and CUDA messages:
  file descriptors 1 and 2) to its kind's file — ``engine.log``, ``learner_av.log``,
  ``learner_ar.log``, ``datagen.log`` — see :func:`redirect_process_output`;
- the driver keeps its own prints, errors and progress bars on the console and sends the library
  loggers (transformers, torch, vLLM, …) and library warnings to ``driver.log`` (transformers'
  progress bars are switched off) — :func:`driver_logs_to_file`.

Several ranks of one kind append to the same file; each process starts with a header line
naming its pid. Files are opened in append mode, so a resumed run adds to them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Library loggers of the driver that go to driver.log ("ray" is not among them: its warnings,
# e.g. actors that cannot be scheduled, must stay visible).
THIRD_PARTY_LOGGERS = ("transformers", "torch", "vllm", "accelerate", "peft", "deepspeed",
                       "datasets", "huggingface_hub", "filelock", "urllib3", "httpx", "safetensors")
DRIVER_LOG = "driver"
_PROJECT_PACKAGES = ("nla_rl", "actors", "launch", "rollout", "bench", "tests")


@dataclass(frozen=True)
class RunLogs:
    """Where a run's process logs go (picklable: sent to every actor at construction)."""

    directory: str  # absolute: actors may run in another working directory
    verbose: bool = False

    def path(self, kind: str) -> Path:
        return Path(self.directory) / f"{kind}.log"


def add_verbose_flag(parser) -> None:
    """``--verbose`` on an argparse command that runs stages (see :func:`with_verbose`)."""
    parser.add_argument("--verbose", action="store_true",
                        help="third-party output (vLLM, Ray actors, transformers) on the console "
                             "instead of <run>/logs/*.log (same as run.verbose=true)")


def with_verbose(args) -> list[str]:
    """``args.overrides``, with ``run.verbose=true`` appended when ``--verbose`` was given."""
    return [*args.overrides, "run.verbose=true"] if args.verbose else list(args.overrides)


def run_logs(cfg, run_dir: str | os.PathLike) -> RunLogs:
    """The run's :class:`RunLogs`: ``<run_dir>/logs``, verbose as ``run.verbose`` says."""
    return RunLogs(str(Path(run_dir, "logs").resolve()), bool(cfg.run.verbose))


def _header(kind: str) -> str:
    return f"==== {kind} pid {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')} ===="


def redirect_process_output(logs: RunLogs | None, kind: str) -> Path | None:
    """In a dedicated process (a Ray actor): send file descriptors 1 and 2 to ``<kind>.log``.

    At the descriptor level, so output written by C/C++ code and by loggers that captured
    ``sys.stderr`` before this call moves too. Call it first in the actor's ``__init__``, before
    vLLM or torch.distributed are imported. Returns the file; ``None`` (nothing changed) when
    ``logs`` is ``None`` or verbose. Never call it in the driver: the console would go dark.
    """
    if logs is None or logs.verbose:
        return None
    path = logs.path(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # whole lines, in order, even if the process is killed
            stream.reconfigure(line_buffering=True)
    print(_header(kind), flush=True)
    return path


def _is_project_file(filename: str) -> bool:
    parts = Path(filename).parts
    return any(p in _PROJECT_PACKAGES for p in parts) and "site-packages" not in parts


@contextmanager
def driver_logs_to_file(logs: RunLogs) -> Iterator[Path | None]:
    """In the driver, for the block: library loggers and library warnings go to ``driver.log``
    instead of the console (the run's own prints, warnings and errors stay). Restores the
    previous logging state on exit. Yields the file, or ``None`` when ``logs.verbose``."""
    if logs.verbose:
        yield None
        return
    path = logs.path(DRIVER_LOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    hf = _transformers_logging()
    bars = hf is not None and hf.is_progress_bar_enabled()
    if bars:  # "Loading weights" / "Writing model shards" on every save and load
        hf.disable_progress_bar()
    saved = {name: _route(logging.getLogger(name), handler) for name in THIRD_PARTY_LOGGERS}
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_project_file(filename):
            return shown(message, category, filename, lineno, file, line)
        handler.emit(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno,
                                       warnings.formatwarning(message, category, filename,
                                                              lineno, line).rstrip(), None, None))

    warnings.showwarning = showwarning
    try:
        yield path
    finally:
        warnings.showwarning = shown
        if bars:
            hf.enable_progress_bar()
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        handler.close()


def _transformers_logging():
    """transformers' logging module, imported now: it adds its console handler when first
    imported, which must happen before the routing (``None`` when it is not installed)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging


def _route(logger: logging.Logger, handler: logging.Handler) -> tuple[list, bool]:
    """``logger``'s console handlers replaced by ``handler``; returns what to restore."""
    saved = (list(logger.handlers), logger.propagate)
    logger.handlers[:] = [h for h in logger.handlers if not _is_console(h)] + [handler]
    logger.propagate = False
    return saved


def _is_console(handler: logging.Handler) -> bool:
    # Any stream but a file: the stream a library captured at import may be a wrapper (a test
    # runner's capture, Ray's), not sys.stderr itself.
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
