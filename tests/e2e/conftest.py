"""A toy-world base LM trained once per session (short), copied into each run that needs it."""

import shutil
from pathlib import Path

import pytest

from launch.train import main
from nla_rl.base_model import resolve_base_model
from nla_rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")
SECRET = "sk-secret-value-never-logged"
# The recipe's own toy LM (≈75 s once per session): the toy world's readout property is tested
# on it, and every pipeline test starts from it.
TOYWORLD = load_recipe(TINY).toyworld
LM_STEPS = TOYWORLD.lm_steps
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
    run_dir = tmp_path_factory.mktemp("toy")
    return resolve_base_model("toyworld", run_dir, seed=0, toyworld=TOYWORLD)


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
