"""``python -m launch.train RECIPE [key=value …]`` — run the pipeline's stages for a recipe.

This is what ``ray job submit -- python -m launch.train …`` and ``make run`` execute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from actors.cluster import actor_logs
from launch.common import RunPaths
from launch.stages import PLANNED, STAGES
from launch.stop import stop_on_sigterm
from nla_rl.atomic import check_writable_dir
from nla_rl.config import dump_recipe, load_recipe
from nla_rl.errors import ConfigError, NLAError
from nla_rl.run_logs import add_verbose_flag, driver_logs_to_file, run_logs, with_verbose
from nla_rl.tracking import Tracker, check_wandb


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rl.steps=10")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    args.overrides = with_verbose(args)
    return args


def run(recipe: str, overrides: list[str]) -> Path:
    """Load the recipe, write it (redacted) to the run directory, run its stages in order."""
    cfg = load_recipe(recipe, overrides)
    missing = [s for s in cfg.run.stages if s not in STAGES]
    if missing:
        raise NLAError(
            "run.stages: " + ", ".join(f"{s!r} is not implemented yet ({PLANNED.get(s, '?')})"
                                       for s in missing)
            + f". Stages available now: {', '.join(STAGES)}"
        )
    run_dir = check_writable_dir(cfg.run.dir, "run.dir")
    check_inputs(cfg)
    check_wandb(cfg)  # not 40 s into the RL stage, after prepare, datagen and SFT
    check_resume(cfg, run_dir)  # a refused resume must leave the run as it was
    logs = run_logs(cfg, run_dir)
    with actor_logs(logs):  # joining a running cluster to ask its size: quietly
        check_cluster(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(cfg, RunPaths(run_dir).recipe)
    # One tracker (one W&B run) for every stage, finished with the run's exit code on any exit.
    with driver_logs_to_file(logs), actor_logs(logs), Tracker(cfg, run_dir) as tracker:
        if not logs.verbose:
            print(f"third-party logs: {logs.directory}/*.log (--verbose shows them here)")
        for stage in cfg.run.stages:
            started = time.perf_counter()
            STAGES[stage](cfg, run_dir, tracker)
            print(f"[{stage}] done in {time.perf_counter() - started:.1f}s")
    return run_dir


def check_inputs(cfg) -> None:
    """The files a recipe names, checked before anything is written (a missing corpus was found
    only after prepare had written init/): the local base model (config, readable safetensors,
    model.layer_index within its depth) for prepare/datagen, the corpus path and format, a
    local teacher's model directory and an API teacher's key variable for datagen. Their content
    is read by the stages. (The templates are checked when the recipe loads, the cluster's size
    by :func:`check_cluster`.)"""
    import json

    from nla_rl.base_model import TINY_PREFIX, TOYWORLD, check_model_dir
    from nla_rl.data.corpus import FORMATS

    stages = set(cfg.run.stages)
    base = cfg.model.base
    if stages & {"prepare", "datagen"} and base != TOYWORLD and not base.startswith(TINY_PREFIX):
        path = check_model_dir(base, "model.base")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        layers = (config.get("text_config") or config).get("num_hidden_layers")
        if isinstance(layers, int) and not cfg.model.layer_index < layers:
            raise ConfigError(f"model.layer_index: {cfg.model.layer_index} is beyond the depth of "
                              f"{base} ({layers} blocks, 0-based); choose K in 0..{layers - 1}")
    if "datagen" not in stages:
        return
    corpus = Path(cfg.data.corpus).expanduser()
    if cfg.data.corpus != TOYWORLD:
        if not corpus.exists():
            raise ConfigError(f"data.corpus: {cfg.data.corpus!r} does not exist; give a local "
                              f"{', '.join(FORMATS)}, or toyworld")
        if corpus.is_file() and corpus.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise ConfigError(f"data.corpus: {cfg.data.corpus!r} has the unknown format "
                              f"{corpus.suffix or '(no suffix)'!r}; supported: "
                              f"{', '.join(FORMATS)}")
    for section in ("teacher", "ar_teacher"):
        teacher = getattr(cfg.data, section)
        if teacher.kind == "local":
            check_model_dir(teacher.model, f"data.{section}.model")
        check_teacher_key(teacher, f"data.{section}")


def check_teacher_key(teacher, section: str = "data.teacher") -> None:
    """An API teacher's key must be in its environment variable before datagen extracts for
    minutes and then fails at the first request. Only the variable's name is ever shown."""
    if teacher.key_env and not os.environ.get(teacher.key_env):
        which = f"{section}.api_key_env" if teacher.api_key_env else "the default"
        raise ConfigError(f"{section}: the {teacher.kind} teacher reads its API key from the "
                          f"environment variable {teacher.key_env} ({which}), which is not set "
                          f"or empty; export {teacher.key_env}=<key> before the run, or set "
                          f"{section}.api_key_env to the variable that holds it")


def check_cluster(cfg) -> None:
    """The CPUs/GPUs the recipe's Ray stages ask for against what they would run on (see
    :func:`actors.cluster.check_cluster_size`) and, on an existing cluster, each bundle against
    its nodes (:func:`actors.cluster.check_nodes_fit`); asked only when a stage uses Ray."""
    from actors.cluster import (EXISTING_CLUSTER, available_resources, check_cluster_size,
                                check_nodes_fit, stage_needs)

    if set(cfg.run.stages) & set(stage_needs(cfg, gpu_engines=False)):
        have, where = available_resources()
        check_cluster_size(cfg, have, where)
        if where == EXISTING_CLUSTER:  # its nodes are known now
            from actors.placement import alive_nodes

            check_nodes_fit(cfg, alive_nodes(), gpu_engines=have.get("GPU", 0.0) > 0)


# Where each resumable stage keeps its checkpoints (under the run directory), and the role its
# checkpoint fingerprints name (launch/sft.py, launch/rl.py).
CHECKPOINT_ROOTS = {"ar_sft": {"AR": ("ar_sft", "ar_sft")},
                    "av_sft": {"AV": ("av_sft", "av_sft")},
                    "rl": {"AV": ("rl/av", "rl_av"), "AR": ("rl/ar", "rl_ar")}}


def check_resume(cfg, run_dir: Path) -> None:
    """With ``run.resume``, refuse now, before anything is written or Ray starts, what a stage
    would refuse when it resumes: a checkpoint of another recipe (the fields that differ are
    named), or RL parts that share no step. The stages repeat the check on what they load."""
    from nla_rl.checkpoint import CheckpointError, CheckpointManager, newest_complete_set

    if not cfg.run.resume:
        return
    for stage in cfg.run.stages:
        managers = {name: CheckpointManager.for_recipe(run_dir / sub, cfg, role, keep_last=None)
                    for name, (sub, role) in CHECKPOINT_ROOTS.get(stage, {}).items()}
        if not managers:
            continue
        try:
            with warnings.catch_warnings():  # damaged checkpoints: the stage itself warns
                warnings.simplefilter("ignore")
                if len(managers) == 1:
                    next(iter(managers.values())).latest_valid()
                else:
                    newest_complete_set(managers)
        except CheckpointError as err:
            raise NLAError(f"run.resume: {stage}: {err}; nothing was written") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stop_on_sigterm():
            run_dir = run(args.recipe, args.overrides)
    except NLAError as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
