"""The rl stage on the tiny recipe: real vLLM engine actor, FSDP2 learner groups, online AR
scored through its EMA, hard negatives, verified weight sync, checkpoints and exact resume of the
step counter (and of the EMA)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launch.train import main
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.sidecar import read_model_sidecar
from tests.e2e.conftest import FAST, TINY

pytestmark = pytest.mark.slow

RL = ["rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=24",
      "rl.length_penalty_margin=8", "rl.save_every=2", "rl.samples_every=1",
      "negatives.enabled=true", "negatives.per_sample=2", "wandb.enabled=true",
      "wandb.mode=offline", "rl.verify_sync_every=1", "rl.ar_ema_decay=0.5"]
BASE = [o for o in FAST if not o.startswith("rl.")] + ["data.num_docs=120"]


def rows(run_dir: Path, stage: str = "rl") -> list[dict]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == stage]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, toy_base) -> Path:
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    run_dir.mkdir()
    shutil.copytree(toy_base, run_dir / "base")
    assert main([TINY, f"run.dir={run_dir}", *BASE, "run.stages=[prepare,datagen]"]) == 0
    # The untrained AV writes no explanations yet: the health check would (rightly) stop it.
    assert main([TINY, f"run.dir={run_dir}", *BASE, *RL, "rl.steps=2", "run.stages=[rl]",
                 "rl.stop_on_unhealthy=false"]) == 0
    return run_dir


def test_an_untrained_av_is_stopped_at_step_one(rl_run, tmp_path, capsys):
    run_dir = tmp_path / "unhealthy"
    shutil.copytree(rl_run, run_dir)
    shutil.rmtree(run_dir / "rl")
    assert main([TINY, f"run.dir={run_dir}", *BASE, *RL, "rl.steps=2", "run.stages=[rl]"]) == 2
    assert "have no <explanation>" in capsys.readouterr().err
    assert not (run_dir / "rl" / "final").exists()


def test_every_step_is_logged_healthy(rl_run):
    logged = rows(rl_run)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert r["health/injection_applied"] == r["health/injection_expected"] == 16
        assert r["health/sync_logp_delta"] < 2e-3  # the engines really run the new weights
        assert -4.0 <= r["reward/mean"] <= 1.0
        # An explained rollout is scored against its drawn hard negatives; a failed one gets the
        # orthogonal-equivalent penalty (the untrained AV here fails often).
        if r["reward/extraction_failure_rate"] < 1.0:
            assert r["reward/gap"] is not None and 0.0 <= r["reward/top1"] <= 1.0
        else:
            assert r["reward/mean"] == pytest.approx(-2.0)
        for key in ("train/av/loss", "reward/top1", "rollout/mean_tokens", "perf/generate_s",
                    "perf/sync_s", "health/cjk_rate", "rollout/zero_variance_groups",
                    "perf/reconstruct_s", "perf/av/compute_s", "train/av/clip_frac",
                    "train/av/is_ratio_mean", "reward/group_std", "health/engine_replacements"):
            assert key in r, key
        # The engines' heartbeat: every call answered well within its deadline (the floor).
        assert 0 < r["health/engine_last_call_s"] < r["health/engine_deadline_s"]
        assert r["health/engine_deadline_s"] >= 600 and r["health/engine_deadline_misses"] == 0
        # The online AR trains on the rollouts' extracted explanations, when there are any.
        assert ("train/ar/loss" in r) == (r["reward/extraction_failure_rate"] < 1.0)
    samples = [json.loads(l) for l in (rl_run / "logs" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("explanation" in s for s in samples)
    wandb_files = list((rl_run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files and b"reward/mean" in wandb_files[0].read_bytes()


def test_finals_and_checkpoints(rl_run):
    for role in ("av", "ar"):
        meta = read_model_sidecar(rl_run / "rl" / "final" / role)
        assert meta.role == role and meta.stage == "rl"
        assert (rl_run / "rl" / role / "step_000002" / "model.safetensors").is_file()
    ar = ActivationReconstructor.from_pretrained(rl_run / "rl" / "final" / "ar")
    assert ar.config.num_hidden_layers == 3


def test_third_party_output_is_in_the_run_logs(rl_run):
    for kind in ("engine", "learner_av", "learner_ar"):
        text = (rl_run / "logs" / f"{kind}.log").read_text()
        assert text.startswith(f"==== {kind} pid "), kind
    engine = (rl_run / "logs" / "engine.log").read_text().splitlines()
    assert len(engine) > 5  # vLLM's start-up and per-step lines, off the console


def test_resume_continues_at_the_next_step(rl_run, tmp_path, capsys):
    run_dir = tmp_path / "resumed"
    shutil.copytree(rl_run, run_dir)
    assert main([TINY, f"run.dir={run_dir}", *BASE, *RL, "rl.steps=3", "run.resume=true",
                 "run.stages=[rl]", "rl.stop_on_unhealthy=false"]) == 0
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]  # steps 1-2 from before, then 3
    console = capsys.readouterr()
    assert "rl 3/3  reward " in console.out  # the step's one line (the resumed step only)
    assert "rl 2/3" not in console.out and "INFO" not in console.out + console.err
    assert (run_dir / "rl" / "av" / "step_000003").is_dir()
