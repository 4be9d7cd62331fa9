"""Tracking: jsonl always, W&B (offline) mirrors it, names are stable, secrets never stored."""

import json
import time
from pathlib import Path

import pytest

from nla_rl.config import load_recipe
from nla_rl.errors import ConfigError
from nla_rl.tracking import SAMPLE_COLUMNS, Tracker, check_metric_names

TINY = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml")
SECRET = "sk-test-0123456789abcdef"


def _all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_metric_names_outside_the_groups_are_rejected():
    check_metric_names({"train/av/loss": 1, "reward/mean": 1, "health/cjk_rate": 0, "perf/x_s": 1})
    with pytest.raises(ValueError, match=r"\['loss', 'rewards/mean'\].*train/av/\*"):
        check_metric_names({"loss": 1, "rewards/mean": 2, "eval/fve": 3})


def test_jsonl_without_wandb(tmp_path):
    cfg = load_recipe(TINY, [])
    tracker = Tracker(cfg, tmp_path)
    tracker.log(3, {"reward/mean": -1.5, "health/cjk_rate": float("nan")}, stage="rl")
    tracker.log_samples(3, [{"activation_id": 7, "explanation": "a red fox", "reward": -0.5,
                             "mse": 0.5, "gap": 0.1, "ignored": 1}])
    tracker.finish()
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{**rows[0], "step": 3, "stage": "rl", "reward/mean": -1.5, "health/cjk_rate": None}]
    sample = json.loads((tmp_path / "logs" / "samples.jsonl").read_text())
    assert list(sample) == list(SAMPLE_COLUMNS) and sample["step"] == 3 and sample["activation_id"] == 7
    assert not (tmp_path / "logs" / "wandb").exists()


def test_wandb_offline_holds_the_metrics_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_WANDB_KEY", SECRET)
    cfg = load_recipe(TINY, ["wandb.enabled=true", "wandb.mode=offline",
                             "wandb.api_key_env=MY_WANDB_KEY", f"wandb.project=p-{SECRET}"])
    with Tracker(cfg, tmp_path) as tracker:
        assert tracker.wandb_run is not None
        tracker.log(0, {"reward/mean": -1.25, "train/ar/fve": 0.125})
        tracker.log_samples(0, [{"activation_id": 1, "explanation": "x", "reward": -1.0,
                                 "mse": 1.0, "gap": 0.0}])
    keys = (b"reward/mean", b"train/ar/fve", b"-1.25", b"rollout/samples", b"api_key_env")
    deadline = time.monotonic() + 30  # W&B's service may still be flushing under a loaded CPU
    while True:
        run_files = list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(run_files) == 1
        data = run_files[0].read_bytes()
        if all(key in data for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key  # metrics, the sample table and the recipe as config
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*/files/media/table/**/*.table.json"))
    assert SECRET.encode() not in _all_bytes(tmp_path)
    first_id = (tmp_path / "logs" / "wandb_run_id").read_text()
    Tracker(cfg, tmp_path).finish()  # a resumed run continues the same W&B run
    assert (tmp_path / "logs" / "wandb_run_id").read_text() == first_id


def test_online_without_a_key_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NLA_TEST_NO_SUCH_KEY", raising=False)
    cfg = load_recipe(TINY, ["wandb.enabled=true", "wandb.mode=online",
                             "wandb.api_key_env=NLA_TEST_NO_SUCH_KEY"])
    with pytest.raises(ConfigError, match="NLA_TEST_NO_SUCH_KEY.*empty"):
        Tracker(cfg, tmp_path)
    assert not (tmp_path / "logs" / "wandb").exists()


def test_a_resumed_stage_rewinds_its_rows_so_the_history_has_each_step_once(tmp_path):
    """Killed after logging RL steps 1-3 with the last checkpoint at step 2: the resumed run logs
    step 3 again, and metrics.jsonl / samples.jsonl hold it once; other stages are untouched."""
    cfg = load_recipe(TINY, [])
    tracker = Tracker(cfg, tmp_path)
    tracker.jsonl.log(5, {"train/ar/loss": 1.0}, stage="ar_sft")
    for step in (1, 2, 3):
        tracker.log(step, {"reward/mean": -float(step)}, stage="rl")
        tracker.log_samples(step, [{"activation_id": step, "explanation": "x"}])
    tracker.jsonl.log(9, {"eval/fve": 0.5}, stage="eval")
    path = tmp_path / "logs" / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write('{"step": 4, "stage": "rl", "rew')  # torn by the kill
    before = path.stat().st_ino

    resumed = Tracker(cfg, tmp_path)
    assert resumed.rewind(2, stage="rl") == 2
    assert path.stat().st_ino != before  # replaced by a rename, never rewritten in place
    resumed.log(3, {"reward/mean": -3.5}, stage="rl")
    resumed.log_samples(3, [{"activation_id": 3, "explanation": "y"}])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("ar_sft", 5), ("rl", 1), ("rl", 2),
                                                        ("eval", 9), ("rl", 3)]
    assert rows[-1]["reward/mean"] == -3.5
    lines = (tmp_path / "logs" / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert [(s["step"], s["explanation"]) for s in samples] == [(1, "x"), (2, "x"), (3, "y")]
    # Nothing to drop: the file is left as it is.
    inode = path.stat().st_ino
    assert resumed.rewind(3, stage="rl") == 0 and path.stat().st_ino == inode


def test_a_console_sees_every_logged_step_and_is_closed_at_the_end(tmp_path):
    import io

    from nla_rl.console import StepConsole

    out = io.StringIO()
    with Tracker(load_recipe(TINY, []), tmp_path, console=StepConsole("rl", 3, file=out)) as tracker:
        tracker.log(1, {"reward/mean": -1.5, "perf/step_s": 2.0}, stage="rl")
        tracker.log(2, {"reward/mean": -1.0, "rollout/fve": float("nan")}, stage="rl")
        assert tracker.console._bar.n == 2
    assert tracker.console._bar is None  # a run stopped early: closed by finish()
    text = out.getvalue()
    assert "rl 1/3  reward -1.5  2.0s" in text and "rl 2/3  reward -1  fve n/a" in text
    with pytest.raises(ValueError):  # names are checked before anything is shown
        tracker.log(3, {"loss": 1.0})


def test_every_stage_logs_to_one_wandb_run_against_its_own_step(tmp_path):
    """SFT rows appear as ar_sft/* against ar_sft/step, RL's keep their names against rl/step
    (1..N), W&B's own step only grows across the stages, and a resumed step is not logged twice."""
    from tests.wandb_history import exit_code, history, step_metrics

    cfg = load_recipe(TINY, ["wandb.enabled=true", "wandb.mode=offline", "ar_sft.steps=3", "ar_sft.warmup_steps=0",
                             "rl.steps=2"])
    with Tracker(cfg, tmp_path) as tracker:
        for step in (1, 2, 3):
            tracker.log(step, {"train/ar/loss": 1.0 / step}, stage="ar_sft")
        for step in (1, 2):
            tracker.log(step, {"reward/mean": -float(step), "train/ar/loss": 0.5}, stage="rl")
        tracker.log(1, {"reward/mean": -9.0}, stage="rl")  # a resumed stage repeats a step
        tracker.log(0, {"eval/fve": 0.25}, stage="eval")
    rows = history(tmp_path / "logs")
    sft = [r for r in rows if "ar_sft/step" in r]
    assert [(r["ar_sft/step"], r["ar_sft/train/ar/loss"]) for r in sft] == [
        (1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    rl = [r for r in rows if "rl/step" in r]
    assert [(r["rl/step"], r["reward/mean"]) for r in rl] == [(1, -1.0), (2, -2.0)]
    assert all("train/ar/loss" not in r for r in sft) and all(r["train/ar/loss"] == 0.5 for r in rl)
    assert [r for r in rows if "eval/step" in r][0]["eval/fve"] == 0.25
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[0] > 0  # ar_sft sits after prepare/datagen/check
    charts = step_metrics(tmp_path / "logs")
    assert charts["ar_sft/*"] == "ar_sft/step" and charts["eval/*"] == "eval/step"
    assert charts["train/*"] == charts["reward/*"] == "rl/step"
    assert exit_code(tmp_path / "logs") == 0


def test_stage_offsets_leave_each_stage_room_for_its_steps():
    from nla_rl.tracking import stage_step_offsets, wandb_name

    cfg = load_recipe(TINY, ["ar_sft.steps=3", "ar_sft.warmup_steps=0", "av_sft.steps=4",
                             "rl.steps=5"])
    offsets = stage_step_offsets(cfg)
    assert list(offsets) == ["prepare", "datagen", "check", "ar_sft", "av_sft", "rl", "export",
                             "eval"]
    assert offsets["av_sft"] - offsets["ar_sft"] == 4  # steps 0..3
    assert offsets["rl"] - offsets["av_sft"] == 5 and offsets["export"] - offsets["rl"] == 6
    assert wandb_name("ar_sft", "train/ar/loss") == "ar_sft/train/ar/loss"
    assert wandb_name("rl", "train/ar/loss") == "train/ar/loss"
    assert wandb_name("eval", "eval/fve") == "eval/fve"


def test_a_failed_stage_still_finishes_the_runs_wandb(tmp_path, monkeypatch):
    """The launcher's tracker is finished (exit code 1) however a stage ends, so no W&B run is
    left open in the process and the history logged before the failure is kept."""
    import wandb

    from launch.stages import STAGES
    from launch.train import run
    from tests.wandb_history import exit_code, history

    def failing(cfg, run_dir, tracker):
        tracker.log(0, {"data/documents": 3}, stage="datagen")
        raise RuntimeError("killed mid-stage")

    monkeypatch.setitem(STAGES, "datagen", failing)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        run(TINY, [f"run.dir={run_dir}", "run.stages=[datagen]", "wandb.enabled=true",
                   "wandb.mode=offline"])
    assert wandb.run is None
    assert exit_code(run_dir / "logs") == 1
    assert [r["datagen/data/documents"] for r in history(run_dir / "logs")] == [3]
