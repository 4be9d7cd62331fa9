"""P2: the fraction of an RL step spent outside generation and the models' forward/backward.

The ``rl`` stage of the tiny recipe runs ``--steps`` GRPO steps in a temporary run directory: a
copy of ``base``, ``init``, ``data`` and the SFT finals (``ar_sft/final``, ``av_sft/final``) of an
existing run (default ``runs/tiny``, made by ``make run``). Every step logs its phases to
``<run>/logs/metrics.jsonl`` (:func:`actors.coordinator.rl_loop`), all wall seconds:

* ``perf/step_s``: the whole step, next batch … verified weight sync (the checkpoint writes come
  after it and are not part of it);
* ``perf/generate_s``: the engine pool's ``generate`` (G samples per activation);
* ``perf/reconstruct_s``: the AR's forward over the explanations, for the rewards;
* ``perf/old_logp_s``: the AV's forward for the old (behaviour) log-probs;
* ``perf/ref_logp_s``: the reference policy's forward (``rl.kl_beta > 0``) and the policy rows;
* ``perf/train_s``: the policy's GRPO step and the AR's online step, run concurrently;
* ``perf/av/compute_s``, ``perf/ar/compute_s``: rank 0's seconds inside forward, backward and the
  optimiser step of each learner (their share of ``train_s``);
* ``perf/sync_s``: weight sync and its verification (measured on its own by P5); it starts when
  the policy's step ends and runs while the AR may still train, so it lengthens the step only
  where it outlasts the AR's step (part of ``train_s``).

Per step::

    inside  = generate_s + reconstruct_s + old_logp_s + ref_logp_s + max(av/compute_s, ar/compute_s)
    outside = step_s - inside            # scoring, advantages, metrics, sync, Ray transfers,
                                         # the learners' batch building and all-reduces
    P2      = mean over steps 2..N of outside / step_s      (step 1 warms up); goal <= 10%

The two learners train at the same time, so the larger compute time is the one on the step's
critical path. The forward calls are timed from the coordinator (their Ray round trips count as
inside); ``train_s - max(compute_s)`` is the learners' own overhead and counts as outside.

Weight sync is a fixed cost per step that P5 targets on its own; the share of ``outside`` left
without it is printed too.

    python bench/p2_rl_step_overhead.py [--run-dir runs/tiny] [--steps 8] [key=value ...]
    python bench/p2_rl_step_overhead.py --metrics <run>/logs/metrics.jsonl   # re-read a run

Extra ``key=value`` arguments are recipe overrides (e.g. ``rl.prompts_per_step=4``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.10
ROOT = Path(__file__).resolve().parents[1]
COPIED = ("base", "init", "data", "ar_sft/final", "av_sft/final")
# (metric, label) in the order of the step; "outside" is computed.
PHASES = (("perf/generate_s", "engine generation"), ("perf/reconstruct_s", "AR forward (score)"),
          ("perf/old_logp_s", "AV forward (old logp)"), ("perf/ref_logp_s", "reference forward"),
          ("perf/train_s", "train (wall, both)"), ("perf/av/compute_s", "  AV fwd/bwd/optim"),
          ("perf/ar/compute_s", "  AR fwd/bwd/optim"), ("perf/sync_s", "weight sync + verify"))
POLICY_STATS = ("clip_frac", "approx_kl", "kl", "is_ratio_mean", "is_capped_frac", "masked_frac")


def prepare_run_dir(source: Path, target: Path) -> None:
    """Copy what the rl stage reads from an existing run into ``target``."""
    missing = [p for p in COPIED if not (source / p).is_dir()]
    if missing:
        raise SystemExit(f"{source}: missing {', '.join(missing)}. Create the run first with "
                         f"`make run` (runs/tiny, about 10 minutes on 2 cores) or pass --run-dir")
    for part in COPIED:
        shutil.copytree(source / part, target / part)


def run_rl(run_dir: Path, steps: int, overrides: list[str], log: Path) -> float:
    """``python -m launch.train recipes/tiny.yaml`` (rl stage only) in a child; its wall time."""
    cmd = [sys.executable, "-m", "launch.train", str(ROOT / "recipes" / "tiny.yaml"),
           f"run.dir={run_dir}", "run.stages=[rl]", f"rl.steps={steps}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local cluster
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"the rl stage failed (exit {code}); last lines of {log}:\n{tail}")
    return time.perf_counter() - started


def overhead(row: dict) -> float:
    """``step_s - inside`` of one logged step (see the module doc)."""
    compute = max(row.get("perf/av/compute_s", 0.0), row.get("perf/ar/compute_s", 0.0))
    inside = sum(row.get(k, 0.0) for k in ("perf/generate_s", "perf/reconstruct_s",
                                           "perf/old_logp_s", "perf/ref_logp_s")) + compute
    return row["perf/step_s"] - inside


def summarise(rows: list[dict]) -> dict:
    """Per-phase means and P2 over the steps after the first."""
    if len(rows) < 2:
        raise SystemExit(f"{len(rows)} rl step(s) logged; P2 needs at least 2 (the first warms up)")
    timed = rows[1:]

    def mean(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    phases = {key: mean(key) for key, _ in PHASES}
    ratios = [overhead(r) / r["perf/step_s"] for r in timed]
    no_sync = [(overhead(r) - r.get("perf/sync_s", 0.0)) / r["perf/step_s"] for r in timed]
    return {"steps_measured": len(timed), "step_s": mean("perf/step_s"), "phases": phases,
            "outside_s": sum(overhead(r) for r in timed) / len(timed),
            "p2": sum(ratios) / len(ratios), "p2_per_step": [round(x, 4) for x in ratios],
            "p2_without_sync": sum(no_sync) / len(no_sync),
            "policy_stats": {k: mean(f"train/av/{k}") for k in POLICY_STATS}}


def print_table(summary: dict) -> None:
    step = summary["step_s"]
    print(f"{'phase':<24}{'mean s':>9}{'of step':>9}")
    rows = [(label, summary["phases"][key]) for key, label in PHASES]
    rows += [("outside (P2)", summary["outside_s"]), ("step", step)]
    for label, seconds in rows:
        if seconds is not None:
            print(f"{label:<24}{seconds:>9.3f}{seconds / step:>9.1%}")
    print(f"P2 = mean(outside / step_s) over {summary['steps_measured']} steps: "
          f"{summary['p2']:.1%} (goal <= {GOAL:.0%}); without the weight sync: "
          f"{summary['p2_without_sync']:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "tiny",
                        help="a run with base, init, data, ar_sft/final, av_sft/final")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    parser.add_argument("--metrics", type=Path, help="summarise this metrics.jsonl; run nothing")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    wall, metrics = None, args.metrics
    if metrics is None:
        tmp = Path(tempfile.mkdtemp(prefix="p2_rl_"))
        prepare_run_dir(args.run_dir.resolve(), tmp / "run")
        wall = run_rl(tmp / "run", args.steps, args.overrides, tmp / "train.log")
        metrics = tmp / "run" / "logs" / "metrics.jsonl"
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("stage") == "rl"]
    if args.metrics is None and not args.keep:
        shutil.rmtree(metrics.parents[2], ignore_errors=True)
    elif args.metrics is None:
        print(f"run directory kept: {metrics.parents[1]}")
    summary = summarise(rows)
    print_table(summary)
    print(json.dumps({"bench": "p2_rl_step_overhead", "steps": len(rows), "stage_wall_s":
                      wall and round(wall, 1), **summary, "goal": GOAL,
                      "met": summary["p2"] <= GOAL}, indent=1))


if __name__ == "__main__":
    main()
