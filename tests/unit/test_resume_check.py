"""A refused resume writes nothing: the recipe is checked against the run's checkpoints before
recipe.yaml is written or Ray starts."""

from pathlib import Path

import pytest

from launch.train import check_resume, main
from nla_rl.checkpoint import CheckpointManager
from nla_rl.config import dump_recipe, load_recipe
from nla_rl.errors import NLAError

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _write(root: Path) -> None:
    (root / "model.bin").write_bytes(b"weights")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run killed during RL: recipe.yaml, SFT and RL checkpoints of seed 0."""
    run = tmp_path / "run"
    cfg = load_recipe(TINY, [f"run.dir={run}"])
    dump_recipe(cfg, run / "recipe.yaml")
    for sub, role in (("av_sft", "av_sft"), ("rl/av", "rl_av"), ("rl/ar", "rl_ar")):
        CheckpointManager.for_recipe(run / sub, cfg, role).save(2, _write)
    return run


@pytest.mark.parametrize("stages", ["[rl]", "[av_sft]", "[av_sft,rl]"])
def test_a_resume_with_a_changed_seed_is_refused_before_any_write(run_dir, stages, capsys):
    before = _files(run_dir)
    assert main([TINY, f"run.dir={run_dir}", "run.resume=true", "run.seed=7",
                 f"run.stages={stages}"]) == 2
    err = capsys.readouterr().err
    assert "run.resume:" in err and "run.seed: this recipe 7, checkpoint 0" in err
    assert "nothing was written" in err
    assert _files(run_dir) == before  # recipe.yaml still says seed 0; no file added


def test_rl_parts_without_a_common_step_are_refused_before_any_write(run_dir, capsys):
    cfg = load_recipe(run_dir / "recipe.yaml", [])
    CheckpointManager.for_recipe(run_dir / "rl" / "av", cfg, "rl_av", keep_last=1).save(4, _write)
    CheckpointManager.for_recipe(run_dir / "rl" / "ar", cfg, "rl_ar", keep_last=1).save(3, _write)
    before = _files(run_dir)
    assert main([TINY, f"run.dir={run_dir}", "run.resume=true", "run.stages=[rl]"]) == 2
    assert "rl: no step has a complete set" in capsys.readouterr().err
    assert _files(run_dir) == before


def test_the_same_recipe_or_no_resume_passes(run_dir):
    check_resume(load_recipe(TINY, [f"run.dir={run_dir}", "run.resume=true"]), run_dir)
    # Without run.resume the stages start over: nothing to check.
    check_resume(load_recipe(TINY, [f"run.dir={run_dir}", "run.seed=7"]), run_dir)
    with pytest.raises(NLAError, match="recipe mismatch"):
        check_resume(load_recipe(TINY, [f"run.dir={run_dir}", "run.resume=true",
                                        "model.layer_index=2", "run.stages=[rl]"]), run_dir)
