"""SIGTERM (``ray job stop``, scancel, Kubernetes) ends a run the way an error does: the tracker
is finished with the stop's exit code and every cleanup runs, instead of Python dying mid-stage."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.wandb_history import exit_code, history

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")

# The real launcher with its datagen stage replaced by one that logs a row, says it started, and
# would then run for minutes.
LAUNCH_A_LONG_STAGE = """
import sys, time
from pathlib import Path
from launch.stages import STAGES
from launch.train import main

def long_stage(cfg, run_dir, tracker):
    tracker.log(0, {"data/documents": 3}, stage="datagen")
    try:
        (Path(run_dir) / "started").touch()
        time.sleep(300)
    finally:
        (Path(run_dir) / "stage_cleaned_up").touch()

STAGES["datagen"] = long_stage
sys.exit(main(sys.argv[1:]))
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds}s"
        time.sleep(0.2)


def test_sigterm_mid_stage_runs_every_cleanup_and_finishes_wandb_with_143(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH_A_LONG_STAGE, TINY, f"run.dir={run_dir}",
         "run.stages=[datagen]", "wandb.enabled=true", "wandb.mode=offline"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "started", proc, 120)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "stopping: SIGTERM received" in err and "Traceback" not in err
    assert (run_dir / "stage_cleaned_up").exists()  # the stage's own finally ran
    assert exit_code(run_dir / "logs") == 143  # the W&B run is marked ended, not left running
    assert [r["datagen/data/documents"] for r in history(run_dir / "logs")] == [3]
