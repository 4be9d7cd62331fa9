"""An interrupted ``nla-rl ablate`` rerun reuses a variant only if it finished with the very
recipe the rerun would use."""

import json
import os
from pathlib import Path

from launch.ablate import finished_earlier
from nla_rl.config import dump_recipe, load_recipe

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")


def _finished_run(run_dir: Path, overrides: list[str]) -> None:
    run_dir.mkdir(parents=True)
    dump_recipe(load_recipe(TINY, overrides), run_dir / "recipe.yaml")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.json").write_text(json.dumps({"metrics": {}}))


def test_a_finished_variant_is_reused_only_with_the_same_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-never-in-a-recipe")
    run_dir = tmp_path / "ablate" / "negatives_off-s1"
    variant = ["negatives.enabled=false", "rl.seed=1", f"run.dir={run_dir}",
               "run.stages=[rl,export,eval]", "run.resume=false"]
    assert not finished_earlier(TINY, variant, run_dir)  # nothing there yet
    _finished_run(run_dir, variant)
    assert finished_earlier(TINY, variant, run_dir)
    assert not finished_earlier(TINY, [*variant, "rl.steps=3"], run_dir)  # run differently
    assert not finished_earlier(TINY, [*variant[:1], "rl.seed=0", *variant[2:]], run_dir)


def test_a_run_that_stopped_before_its_eval_is_redone(tmp_path):
    run_dir = tmp_path / "recipe-s0"
    variant = ["rl.seed=0", f"run.dir={run_dir}", "run.stages=[rl,export,eval]"]
    _finished_run(run_dir, variant)
    report = run_dir / "eval" / "report.json"
    older = (run_dir / "recipe.yaml").stat().st_mtime_ns - 10**9
    os.utime(report, ns=(older, older))  # a report left from before this run started
    assert not finished_earlier(TINY, variant, run_dir)
    report.unlink()
    assert not finished_earlier(TINY, variant, run_dir)
