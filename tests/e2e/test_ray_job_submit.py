"""The main job under ``ray job submit`` against a running head, token authentication on.

The head is started by the test in its own process group, temp dir and ports (never `ray stop`,
which would end every Ray cluster of the user), with a token of its own; a client without the
token is refused and runs nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import FAST, ROOT

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token_file: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # As a user with the project's environment activated: `python` is the venv's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("head")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    import ray

    ray.shutdown()  # a local cluster an earlier test started in this process holds default ports
    port, dash = _free_port(), _free_port()
    # Every port the head and its agents listen on is chosen free: another Ray on the machine
    # holding a default port (e.g. the job agent's 52365) would leave the head with no job agent.
    ports = {flag: _free_port() for flag in (
        "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
        "--runtime-env-agent-port", "--ray-client-server-port", "--node-manager-port",
        "--object-manager-port")}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         f"--temp-dir={root / 'ray'}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *(f"{flag}={value}" for flag, value in ports.items())],
        env=_env(token), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except Exception:  # not up yet (an auth refusal also proves it is up)
                if getattr(sys.exc_info()[1], "code", None) in (401, 403):
                    break
                time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up within 90 s")
        yield address, token, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _submit(address: str, token_file: Path, *args: str) -> subprocess.CompletedProcess:
    command = [RAY, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
               "python", "-m", "launch.train", "recipes/tiny.yaml", *args]
    for _ in range(30):  # a fresh head answers before its job agent is up: retry that only
        out = subprocess.run(command, env=_env(token_file), capture_output=True, text=True,
                             timeout=600)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


def test_a_client_without_the_token_is_refused(head, tmp_path):
    address, _, _ = head
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    out = _submit(address, wrong, f"run.dir={tmp_path / 'never'}", "run.stages=[prepare]")
    assert out.returncode != 0
    assert "nauthorized" in out.stdout + out.stderr or "uthentication" in out.stdout + out.stderr
    assert not (tmp_path / "never").exists()


def test_the_whole_pipeline_runs_as_a_ray_job(head, tmp_path, toy_base):
    address, token, _ = head
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(toy_base, run_dir / "base")
    out = _submit(address, token, f"run.dir={run_dir}", *FAST)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    stages = {json.loads(line).get("stage")
              for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()}
    assert {"check", "ar_sft", "av_sft", "rl"} <= stages
    assert (run_dir / "export" / "av" / "nla_meta.yaml").is_file()
    assert (run_dir / "eval" / "report.json").is_file()
