"""Run tracking: every metric goes to ``<run>/logs/metrics.jsonl``; W&B mirrors it when enabled,
and a console (one compact line per step, :mod:`nla_rl.console`) shows it when given.

Metric names are stable and grouped (``train/av/*``, ``train/ar/*``, ``rollout/*``, ``reward/*``,
``eval/*``, ``perf/*``, ``health/*``, the data stage's ``data/*``, the check stage's ``roundtrip/*``
and ``toy/*``): a name outside the groups is a bug, caught here rather than on a dashboard.

One W&B run holds every stage of a run directory. Each stage charts against its own step
(``wandb.define_metric``): RL's metrics keep their names and ``rl/step`` (1..N, as always); every
other stage's metrics appear under its name (``ar_sft/train/ar/loss`` against ``ar_sft/step``).
W&B's own step, which must only grow, is the stage's step plus a fixed offset per stage
(:func:`stage_step_offsets`), so a resumed or re-run stage lands on the W&B steps it had before
(W&B ignores them: one history). W&B receives the resolved recipe with secrets redacted; its API key is read from
the environment variable the recipe names and handed to W&B in memory, never written anywhere.
``wandb`` is imported only when enabled, so the core does not need it installed.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

from nla_rl.atomic import atomic_write_text
from nla_rl.config import ALL_STAGES, RecipeConfig, redact
from nla_rl.errors import ConfigError
from nla_rl.metrics_log import MetricsLog

METRIC_GROUPS = ("train/av", "train/ar", "rollout", "reward", "eval", "perf", "health", "data",
                 "roundtrip", "toy")
# The top-level groups RL logs under; in W&B they chart against rl/step.
RL_GROUPS = ("train", "rollout", "reward", "perf", "health")
_METRIC_NAME = re.compile(r"^(" + "|".join(map(re.escape, METRIC_GROUPS)) + r")/[A-Za-z0-9_./@-]+$")
SAMPLE_COLUMNS = ("step", "policy_version", "activation_id", "explanation", "reward", "mse", "gap",
                  "truth", "toy_recall", "toy_precision")
# policy_version: the AV version that wrote the rollout (step - rl.async_level at most);
# truth/toy_*: toy-world ground truth (None elsewhere).
WANDB_ID_FILE = "wandb_run_id"  # the same W&B run continues when the run directory resumes


def check_metric_names(metrics: dict[str, Any]) -> None:
    """Raise if a metric name is outside the stable groups (a typo would make a new chart)."""
    bad = sorted(k for k in metrics if not _METRIC_NAME.match(k))
    if bad:
        raise ValueError(f"metric names {bad} are outside the groups "
                         f"{', '.join(g + '/*' for g in METRIC_GROUPS)}; rename them")


def stage_step_offsets(cfg: RecipeConfig) -> dict[str, int]:
    """W&B's step of each stage's step 0: the stages in pipeline order, each given its recipe's
    step count + 1 (the stages without steps log once, at 0). Derived from the recipe alone, so
    every invocation of a run directory (a stage run alone, a resume) agrees on it."""
    offsets, offset = {}, 0
    for stage in ALL_STAGES:
        offsets[stage] = offset
        section = getattr(cfg, stage, None)
        offset += getattr(section, "steps", 0) + 1
    return offsets


def wandb_name(stage: str | None, name: str) -> str:
    """A metric's W&B name: RL's (and a stageless log's) as it is; another stage's under
    ``<stage>/``, unless it already is there (the eval stage's ``eval/*``)."""
    if stage in (None, "rl") or name.startswith(f"{stage}/"):
        return name
    return f"{stage}/{name}"


class Tracker:
    """The run's metrics: ``logs/metrics.jsonl`` always, W&B when enabled, a console when given.

    The launcher holds one for the whole run and hands it to every stage, so W&B is started once,
    before the first stage, and finished (with the exit code) however the run ends."""

    def __init__(self, cfg: RecipeConfig, run_dir: str | Path, *, job_type: str = "train",
                 console=None):
        """``console``: e.g. a :class:`nla_rl.console.StepConsole`, shown each logged step."""
        self.run_dir = Path(run_dir)
        self.console = console
        self.logs_dir = self.run_dir / "logs"
        self.jsonl = MetricsLog(self.logs_dir / "metrics.jsonl")
        self.samples_path = self.logs_dir / "samples.jsonl"
        self.offsets = stage_step_offsets(cfg)
        self._wandb_run = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self._wandb_run = _start_wandb(cfg, self.logs_dir, job_type)
            _define_stage_metrics(self._wandb_run)

    @property
    def wandb_run(self):
        return self._wandb_run

    def log(self, step: int, metrics: dict[str, float], **context) -> dict:
        """Log ``metrics`` at ``step`` to the jsonl file (always) and W&B (when enabled);
        ``context`` (e.g. ``stage="ar_sft"``) goes in the jsonl row."""
        check_metric_names(metrics)
        row = self.jsonl.log(step, metrics, **context)
        if self._wandb_run is not None:
            self._wandb_log(context.get("stage"), step, {k: row[k] for k in metrics})
        if self.console is not None:
            self.console.log(step, metrics)
        return row

    def _wandb_log(self, stage: str | None, step: int, values: dict) -> None:
        if stage is None:  # a tracker used outside the pipeline: W&B's step is the step
            self._wandb_run.log(values, step=step)
            return
        if stage not in self.offsets:
            raise ValueError(f"stage {stage!r} is not a pipeline stage ({', '.join(self.offsets)})")
        row = {f"{stage}/step": step, **{wandb_name(stage, k): v for k, v in values.items()}}
        self._wandb_run.log(row, step=self.offsets[stage] + step)

    def log_samples(self, step: int, samples: Sequence[dict], stage: str = "rl") -> None:
        """A table of rollouts (columns ``SAMPLE_COLUMNS``) to ``logs/samples.jsonl`` and W&B."""
        rows = [{c: (step if c == "step" else s.get(c)) for c in SAMPLE_COLUMNS} for s in samples]
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with self.samples_path.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            import wandb

            table = wandb.Table(columns=list(SAMPLE_COLUMNS),
                                data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
            self._wandb_log(stage, step, {"rollout/samples": table})

    def rewind(self, step: int, stage: str) -> int:
        """Forget what ``stage`` logged after ``step`` in ``metrics.jsonl`` (and, for RL, the
        samples table, which only RL writes): a stage resumed (or re-run) from ``step`` logs
        those steps again. W&B keeps its history (it ignores the repeated steps of a resumed
        run). Returns the metric rows dropped."""
        from nla_rl.metrics_log import rewind_jsonl

        if stage == "rl":
            rewind_jsonl(self.samples_path, lambda row: row.get("step", 0) > step)
        return self.jsonl.rewind(step, stage)

    @contextmanager
    def showing(self, console) -> Iterator["Tracker"]:
        """Show each step logged inside the block on ``console`` (a stage's progress); the
        console is closed on leaving, however the block ends."""
        previous, self.console = self.console, console
        try:
            yield self
        finally:
            console.close()
            self.console = previous

    def finish(self, exit_code: int | None = None) -> None:
        """Close the console and finish W&B (``exit_code`` 1 marks a failed run); idempotent."""
        if self.console is not None:
            self.console.close()
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
        self.finish(exit_code=None if exc_type is None else code)


def _define_stage_metrics(run) -> None:
    """Each stage's charts against its own step (see the module docstring)."""
    for stage in ALL_STAGES:
        run.define_metric(f"{stage}/step")
        if stage != "rl":
            run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
    for group in RL_GROUPS:
        run.define_metric(f"{group}/*", step_metric="rl/step")


def check_wandb(cfg: RecipeConfig) -> None:
    """Raise now what starting W&B would raise later: wandb not installed, or mode online with
    the key's environment variable empty. Cheap (no network, no run created), so the launcher
    calls it before any stage runs."""
    if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb.enabled is true but wandb is not installed: pip install "
                          "'nla-rl[wandb]', or set wandb.enabled=false")
    if cfg.wandb.mode == "online" and not os.environ.get(cfg.wandb.api_key_env):
        raise ConfigError(f"wandb.mode is online but the environment variable "
                          f"{cfg.wandb.api_key_env} (wandb.api_key_env) is empty; export the key "
                          f"there, or use wandb.mode=offline")


def _start_wandb(cfg: RecipeConfig, logs_dir: Path, job_type: str):
    check_wandb(cfg)
    import wandb

    key = os.environ.get(cfg.wandb.api_key_env)
    logs_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(silent=True, disable_code=True, save_code=False, disable_git=True)
    if key and cfg.wandb.mode == "online":
        settings["api_key"] = key  # in memory only: never in the recipe, the logs or the config
    # Every string W&B stores goes through redact(): a secret must not ride in on a name either.
    run = wandb.init(project=redact(cfg.wandb.project), entity=redact(cfg.wandb.entity),
                     name=redact(cfg.run.name),
                     id=_run_id(logs_dir), resume="allow", dir=str(logs_dir),
                     mode=cfg.wandb.mode, job_type=job_type, config=redact(cfg),
                     settings=wandb.Settings(**settings))
    return run


def _run_id(logs_dir: Path) -> str:
    """A run id stored beside the logs, so a resumed run appends to the same W&B run."""
    path = logs_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id)
    return run_id
