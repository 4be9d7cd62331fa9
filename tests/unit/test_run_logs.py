"""What the console shows of a run: one compact line per RL step; third-party output in
<run>/logs/<kind>.log unless run.verbose / --verbose."""

import io
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from nla_rl.config import load_recipe
from nla_rl.console import StepConsole, step_line
from nla_rl.run_logs import RunLogs, driver_logs_to_file, run_logs

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny.yaml")

STEP = {"reward/mean": -0.41234, "reward/std": 0.2, "rollout/fve": 0.3101, "train/av/kl": 0.00213,
        "train/av/approx_kl": 0.0, "rollout/mean_tokens": 23.4, "rollout/toy/recall": 0.625,
        "rollout/toy/precision": 0.7109, "perf/step_s": 4.2049, "health/cjk_rate": 0.0}


# ------------------------------------------------------------------------------ the step line
def test_step_line_shows_the_numbers_that_judge_a_step():
    assert step_line("rl", 12, 80, STEP) == (
        "rl 12/80  reward -0.412  fve 0.31  kl 0.00213  len 23.4  recall 0.625  prec 0.711  4.2s")


def test_step_line_leaves_out_what_was_not_logged():
    line = step_line("rl", 3, 100, {"reward/mean": 0.5, "train/av/approx_kl": 1e-5,
                                    "rollout/fve": float("nan"), "perf/step_s": 61.0})
    assert line == "rl   3/100  reward 0.5  fve n/a  kl_old 1.00e-05  61.0s"
    assert "recall" not in line and "len" not in line  # no toy world, no length logged


def test_step_console_writes_one_line_per_step_beside_a_bar_starting_at_the_resumed_step():
    out = io.StringIO()
    console = StepConsole("rl", 10, file=out)
    console.log(4, STEP)  # resumed after step 3
    console.log(5, {**STEP, "reward/mean": 0.25})
    assert console._bar.n == 5
    console.log(10, STEP)  # the last step closes the bar
    assert console._bar is None
    lines = [ln for ln in out.getvalue().replace("\r", "\n").splitlines() if ln.startswith("rl ")]
    assert len(lines) == 3 and lines[0].startswith("rl  4/10  reward -0.412")
    assert lines[1].startswith("rl  5/10  reward 0.25")


# --------------------------------------------------------------------------- the verbose flag
def test_verbose_comes_from_the_flag_or_the_recipe(tmp_path):
    from launch.cli import build_parser
    from launch.train import parse_args

    assert load_recipe(TINY).run.verbose is False
    args = parse_args([TINY, "rl.steps=3", "--verbose"])
    assert args.overrides == ["rl.steps=3", "run.verbose=true"]
    assert load_recipe(TINY, args.overrides).run.verbose is True
    assert parse_args([TINY, "rl.steps=3"]).overrides == ["rl.steps=3"]
    cli = build_parser().parse_args(["run", TINY, "--verbose"])
    assert cli.verbose is True
    cfg = load_recipe(TINY, ["run.verbose=true", f"run.dir={tmp_path / 'r'}"])
    logs = run_logs(cfg, cfg.run.dir)
    assert logs.verbose and logs.path("engine") == (tmp_path / "r" / "logs" / "engine.log")


_CHILD = textwrap.dedent("""
    import ctypes, logging, sys
    from nla_rl.run_logs import RunLogs, redirect_process_output
    print("before", flush=True)
    redirect_process_output(RunLogs(sys.argv[1], verbose=sys.argv[2] == "1"), "engine")
    print("python print")
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("vllm").info("vllm INFO line")
    ctypes.CDLL(None).puts(b"C-level write")  # what vLLM's and torch's C++ code print
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_an_actor_process_writes_its_output_to_its_kind_file(tmp_path, verbose):
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), "1" if verbose else "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "before" in console
    expected = ("python print", "vllm INFO line", "C-level write")
    if verbose:  # nothing moved
        assert all(text in console for text in expected) and not (tmp_path / "engine.log").exists()
    else:
        log = (tmp_path / "engine.log").read_text()
        assert log.startswith("==== engine pid ") and all(text in log for text in expected)
        assert not any(text in console for text in expected)


def test_driver_library_logs_and_warnings_go_to_the_file_and_come_back(tmp_path, capsys):
    hf = logging.getLogger("transformers.modeling_utils")
    console_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("transformers").addHandler(console_handler)
    shown = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
            with driver_logs_to_file(RunLogs(str(tmp_path))) as path:
                hf.warning("Some weights were not initialized")
                warnings.warn_explicit("a torch warning", UserWarning, "/x/site-packages/torch/nn.py", 3)
                warnings.warn_explicit("our own warning", UserWarning, str(ROOT / "nla_rl" / "x.py"), 1)
                print("[rl] our own line")
                from transformers.utils import logging as hf_logging

                assert not hf_logging.is_progress_bar_enabled()
        text = path.read_text()
        assert "Some weights were not initialized" in text and "a torch warning" in text
        assert shown == ["our own warning"]  # the project's warnings are shown as before
        err = capsys.readouterr()
        assert "[rl] our own line" in err.out
        assert "Some weights" not in err.err and "a torch warning" not in err.err
        assert console_handler in logging.getLogger("transformers").handlers  # restored
        from transformers.utils import logging as hf_logging

        assert hf_logging.is_progress_bar_enabled()  # switched off inside the block only
        with driver_logs_to_file(RunLogs(str(tmp_path / "v"), verbose=True)) as none:
            hf.warning("verbose: on the console")
        assert none is None and "verbose: on the console" in capsys.readouterr().err
    finally:
        logging.getLogger("transformers").removeHandler(console_handler)
