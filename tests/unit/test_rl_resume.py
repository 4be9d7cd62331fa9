"""RL resume after a crash between the AR's and the AV's checkpoint commit: the newest complete
AV/AR pair (with the AV's data cursor and progress) is restored, not refused."""

from types import SimpleNamespace

import numpy as np
import pytest

from launch.rl import resume, save_both
from launch.sft import SFTStageError
from nla_rl.checkpoint import CheckpointManager, DataCursor
from nla_rl.config import recipe_from_dict


class FakeLearner:
    """A learner group's checkpoint surface: save(step, extra_files) through a real manager,
    load_state(path) recording what was restored."""

    def __init__(self, root, cfg, role, keep_last):
        self.checkpoints = CheckpointManager.for_recipe(root, cfg, f"rl_{role}",
                                                        keep_last=keep_last)
        self.role, self.step, self.loaded = role, 0, None
        self.spec = SimpleNamespace(model=SimpleNamespace(reward_basis=""))  # raw reward basis

    def save(self, step, *, extra_files=None):
        def write(staging):
            (staging / "weights.txt").write_text(f"{self.role} after step {step}")
            if extra_files is not None:
                extra_files(staging)
        return self.checkpoints.save(step, write)

    def load_state(self, path):
        self.loaded = (path / "weights.txt").read_text()


def world_for(tmp_path, cfg):
    keep = cfg.rl.keep_last
    return SimpleNamespace(
        policy=FakeLearner(tmp_path / "rl" / "av", cfg, "av", keep),
        critic=FakeLearner(tmp_path / "rl" / "ar", cfg, "ar", keep + 1),
        data=SimpleNamespace(vectors=np.zeros((10, 4)), cursor=DataCursor(10, cfg.run.seed)),
        skipped_steps=0.0)


def test_a_crash_between_the_two_commits_resumes_the_newest_complete_pair(tmp_path, capsys):
    cfg = recipe_from_dict({}, ["run.resume=true", "rl.keep_last=1"])
    world = world_for(tmp_path, cfg)
    for step in (10, 20):
        world.data.cursor.next_indices(3)
        save_both(world, step, skipped=float(step) / 10)
    cursor_at_20 = world.data.cursor.state_dict()
    world.critic.save(30)  # the AR of step 30 is committed, then the run is killed
    world.data.cursor.next_indices(3)

    fresh = world_for(tmp_path, cfg)
    assert resume(fresh, cfg) == 20
    assert fresh.policy.loaded == "av after step 20" and fresh.critic.loaded == "ar after step 20"
    assert fresh.data.cursor.state_dict() == cursor_at_20 and fresh.skipped_steps == 2.0
    assert "ignoring AR checkpoint(s) [30]" in capsys.readouterr().out


def test_parts_without_a_common_step_are_refused_with_the_fix(tmp_path):
    cfg = recipe_from_dict({}, ["run.resume=true"])
    world = world_for(tmp_path, cfg)
    world.critic.save(10)
    world.policy.save(20)
    with pytest.raises(SFTStageError, match=r"rl: no step has a complete set.*delete"):
        resume(world_for(tmp_path, cfg), cfg)


def test_nothing_to_resume_starts_at_step_0(tmp_path):
    cfg = recipe_from_dict({}, ["run.resume=true"])
    world = world_for(tmp_path, cfg)
    assert resume(world, cfg) == 0
    world.critic.save(10)  # killed inside the very first save
    assert resume(world_for(tmp_path, cfg), cfg) == 0


def test_the_world_saves_through_its_checkpoint_function(tmp_path):
    """RLWorld is built with its checkpoint function (no lambda set afterwards); world.save
    writes both learners with the cursor and progress, which resume restores."""
    from actors.coordinator import RLWorld

    cfg = recipe_from_dict({}, ["run.resume=true"])
    parts = world_for(tmp_path, cfg)
    world = RLWorld(cfg=cfg, policy=parts.policy, critic=parts.critic, engines=None,
                    data=parts.data, tracker=None, prompt_ids=[], prefill="", eos_ids=frozenset(),
                    mse_scale=None, checkpoint=save_both)
    world.data.cursor.next_indices(3)
    world.save(10, 1.5)
    fresh = world_for(tmp_path, cfg)
    assert resume(fresh, cfg) == 10 and fresh.skipped_steps == 1.5
    assert fresh.data.cursor.state_dict() == world.data.cursor.state_dict()
