"""P8: RL step time with the next batch generated during the update (``rl.async_level=1``) ÷ the
synchronous loop (``rl.async_level=0``), same recipe, same SFT pair, same machine, one bench run.

Each level runs the ``rl`` stage of the tiny recipe for ``--steps`` steps in its own temporary
copy of an existing run's data and SFT finals (default ``runs/tiny``, made by ``make run``), one
after the other (``--rounds`` > 1 alternates them, to spread the machine's drift over both). Per
level, over the steps after the first (which warms up):

* ``perf/step_s``: the whole step (the number P8 compares);
* ``perf/generate_s``: the generation's own wall time (at level 1 it ran during the previous step);
* ``perf/generate_wait_s``: how long the step waited for its rollouts (≈ generate_s at level 0);
* ``perf/train_s``: both learners' update, including the sync (and, at level 1, the wait for
  the generation still running on the old weights: ``perf/sync_wait_s``).

    P8 = mean step_s at level 1 / mean step_s at level 0        goal <= 0.7
    bound = max(generate_s, step_s - generate_s) / step_s at level 0
            the best any overlap of generation with the rest of the step can reach


The goal holds where generation and training can overlap: engines and learners on their own
cores or devices. On a 2-core machine that also runs the learners' ranks, the two compete for
the same cores and the overlap saves only the time either side leaves a core idle.

    python bench/p8_async.py [--run-dir runs/tiny] [--steps 8] [--rounds 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p2_rl_step_overhead import ROOT, prepare_run_dir, run_rl  # noqa: E402

GOAL = 0.7
PHASES = ("perf/step_s", "perf/generate_s", "perf/generate_wait_s", "perf/train_s",
          "perf/sync_wait_s", "perf/sync_s")


def run_level(source: Path, level: int, steps: int, overrides: list[str]) -> tuple[list, float]:
    """The logged rl rows and the stage's wall time of one run at ``level``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"p8_level{level}_"))
    try:
        prepare_run_dir(source, tmp / "run")
        wall = run_rl(tmp / "run", steps, [*overrides, f"rl.async_level={level}"],
                      tmp / "train.log")
        lines = (tmp / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("stage") == "rl"], wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def means(rows: list[dict]) -> dict:
    """Per-phase means over the steps after the first."""
    if len(rows) < 2:
        raise SystemExit(f"{len(rows)} rl step(s) logged; P8 needs at least 2 per level")
    timed = rows[1:]
    return {key: sum(r.get(key, 0.0) for r in timed) / len(timed) for key in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "tiny",
                        help="a run with base, init, data, ar_sft/final, av_sft/final")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the levels this often")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    rows, walls = {0: [], 1: []}, {0: 0.0, 1: 0.0}
    for _ in range(args.rounds):
        for level in (0, 1):
            logged, wall = run_level(args.run_dir.resolve(), level, args.steps, args.overrides)
            rows[level].append(means(logged))
            walls[level] += wall
    per_level = {level: {k: sum(r[k] for r in runs) / len(runs) for k in PHASES}
                 for level, runs in rows.items()}
    print(f"{'mean s over steps 2..N':<26}{'level 0':>10}{'level 1':>10}")
    for key in PHASES:
        print(f"{key:<26}{per_level[0][key]:>10.3f}{per_level[1][key]:>10.3f}")
    p8 = per_level[1]["perf/step_s"] / per_level[0]["perf/step_s"]
    step, generate = per_level[0]["perf/step_s"], per_level[0]["perf/generate_s"]
    bound = max(generate, step - generate) / step
    hidden = (1 - p8) / (1 - bound) if bound < 1 else float("nan")
    print(f"P8 = step_s(level 1) / step_s(level 0) = {p8:.3f} (goal <= {GOAL}); bound "
          f"{bound:.3f} (generation is {generate / step:.0%} of a synchronous step; "
          f"{hidden:.0%} of what overlap could save was saved)")
    print(json.dumps({"bench": "p8_async", "steps": args.steps, "rounds": args.rounds,
                      "levels": per_level, "stage_wall_s": walls, "p8": p8, "bound": bound,
                      "hidden_fraction": hidden, "goal": GOAL,
                      "met": p8 <= GOAL}, indent=1))


if __name__ == "__main__":
    main()
