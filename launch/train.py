"""``python -m launch.train RECIPE [key=value …]`` — run the pipeline's stages for a recipe.

This is what ``ray job submit -- python -m launch.train …`` and ``make run`` execute.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from actors.cluster import actor_logs
from launch.stages import PLANNED, STAGES
from nla_rl.config import dump_recipe, load_recipe
from nla_rl.errors import NLAError
from nla_rl.run_logs import add_verbose_flag, driver_logs_to_file, run_logs, with_verbose


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
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(cfg, run_dir / "recipe.yaml")
    logs = run_logs(cfg, run_dir)
    with driver_logs_to_file(logs), actor_logs(logs):
        if not logs.verbose:
            print(f"third-party logs: {logs.directory}/*.log (--verbose shows them here)")
        for stage in cfg.run.stages:
            started = time.perf_counter()
            STAGES[stage](cfg, run_dir)
            print(f"[{stage}] done in {time.perf_counter() - started:.1f}s")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_dir = run(args.recipe, args.overrides)
    except NLAError as err:  # bad input: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
