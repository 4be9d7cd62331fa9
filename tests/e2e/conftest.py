"""A toy-world base LM trained once per session (short), copied into each run that needs it."""

import shutil
from pathlib import Path

import pytest

from launch.train import main
from nla_rl.data.toy_lm import train_toy_lm

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
SECRET = "sk-secret-value-never-logged"
LM_STEPS = 40  # enough for the pipeline's mechanics; learning quality is measured elsewhere
# Overrides that keep an end-to-end run to seconds on 2 cores.
FAST = [f"toyworld.lm_steps={LM_STEPS}", "data.num_docs=60", "data.docs_per_shard=20",
        "ar_sft.steps=2", "av_sft.steps=2", "ar_sft.batch_size=8", "av_sft.batch_size=8",
        "ar_sft.micro_batch_size=2", "av_sft.micro_batch_size=2", "ar_sft.warmup_steps=0",
        "av_sft.warmup_steps=0", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2",
        "rl.max_new_tokens=8", "rl.length_penalty_margin=4",
        # two SFT steps leave the AV unable to close an explanation: keep RL's mechanics running
        "rl.stop_on_unhealthy=false"]


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory) -> Path:
    return train_toy_lm(tmp_path_factory.mktemp("toy") / "base", seed=0, steps=LM_STEPS,
                        hidden=128, layers=4, progress=False)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, toy_base) -> Path:
    """The whole tiny pipeline (FAST) once per session; tests that write into it copy it or own
    it. An API-key-like secret is in the environment while it runs: nothing may log it."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "tiny"
    run_dir.mkdir()
    shutil.copytree(toy_base, run_dir / "base")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", SECRET)
        assert main([TINY, f"run.dir={run_dir}", *FAST]) == 0
    return run_dir


@pytest.fixture
def new_run(tmp_path, toy_base):
    """A fresh run directory that already holds the session's trained toy LM."""
    def make(name: str = "run") -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        shutil.copytree(toy_base, run_dir / "base")
        return run_dir
    return make
