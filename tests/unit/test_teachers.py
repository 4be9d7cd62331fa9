"""Teachers: answer cleaning, the resumable cache, the HTTP teachers against a scripted local
server (retries, timeouts, concurrency, secrets) and the in-process transformers teacher."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nla_rl.data.teachers import (AnthropicTeacher, LocalTeacher, OpenAIChatTeacher, Teacher,
                                  TeacherCache, TeacherRequest, clean_explanation, label_cached,
                                  status_counts, teacher_metadata)
from nla_rl.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-SECRET-0123456789"
GOOD = "The model is in the middle of a sentence and expects a noun.\n\nThe topic is cooking."


class FakeAPI:
    """Scripted server state: ``script[n]`` answers request n (then ``answer`` for the rest)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.script: list[tuple | None] = []  # (status, headers, body, delay_s); None = answer
        self.answer = lambda prefix: GOOD
        self.delay = 0.0
        self.inflight = self.max_inflight = 0

    def reply(self, n: int, path: str, body: dict) -> tuple:
        if n < len(self.script) and self.script[n] is not None:
            return self.script[n]
        prefix = re.search(r"<text>\n(.*)\n</text>", body["messages"][-1]["content"], re.S).group(1)
        text = self.answer(prefix)
        if path.endswith("/messages"):
            return 200, {}, {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}, self.delay
        msg = {"role": "assistant", "content": text}
        return 200, {}, {"choices": [{"index": 0, "message": msg}]}, self.delay

    @property
    def prefixes(self) -> list[str]:
        return [re.search(r"<text>\n(.*)\n</text>", r["body"]["messages"][-1]["content"], re.S)
                .group(1) for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        api: FakeAPI = self.server.api
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with api.lock:
            n = len(api.requests)
            api.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "body": body})
            api.inflight += 1
            api.max_inflight = max(api.max_inflight, api.inflight)
        try:
            status, headers, payload, delay = api.reply(n, self.path, body)
            time.sleep(delay)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left
        finally:
            with api.lock:
                api.inflight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.api = FakeAPI()
    server.api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.api
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)


def openai(api, **kw) -> OpenAIChatTeacher:
    kw = {"backoff_base_s": 0.001, "timeout_s": 5.0, **kw}
    return OpenAIChatTeacher(api.url + "/v1", "gpt-test", **kw)


def reqs(n: int, start: int = 0) -> list[TeacherRequest]:
    return [TeacherRequest(f"{i}:50", f"document {i} text {{braces}}") for i in range(start, start + n)]


# -- cleaning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected, status", [
    ("Here are the features:\n\n1. **Syntax:** mid-sentence,\nexpects a noun.\n2. Topic: cooking.",
     "Syntax: mid-sentence, expects a noun.\n\nTopic: cooking.", "ok"),
    ("## Features\n- one\n* two\n• three", "one\n\ntwo\n\nthree", "ok"),
    ("<explanation>\nA first.\n\nA second.\n</explanation>", "A first.\n\nA second.", "ok"),
    ("Only one paragraph here.", None, "too_few_features"),
    ("", None, "too_few_features"),
    ("I can't help with that.\n\nSorry.", None, "refused"),
    ("I cannot do this.", None, "refused"),
    ("Sure.\n\nAs an AI language model I have no view.", None, "refused"),
])
def test_clean_explanation(raw, expected, status):
    assert clean_explanation(raw) == (expected, status)


def test_min_features_is_configurable():
    assert clean_explanation("Only one paragraph.", min_features=1) == ("Only one paragraph.", "ok")
    assert clean_explanation(GOOD, min_features=3) == (None, "too_few_features")


# -- HTTP teachers --------------------------------------------------------------------------------

def test_openai_happy_path(api):
    t = openai(api, system_prompt="Be brief.", temperature=0.5, max_tokens=123)
    assert isinstance(t, Teacher)
    out = t.label(reqs(2))
    assert [r.key for r in out] == ["0:50", "1:50"] and {r.status for r in out} == {"ok"}
    assert out[0].explanation == GOOD and out[0].raw == GOOD
    req = api.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "gpt-test" and body["max_tokens"] == 123 and body["temperature"] == 0.5
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == "Be brief."
    assert sorted(api.prefixes) == ["document 0 text {braces}", "document 1 text {braces}"]


def test_anthropic_happy_path(api, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY + "x")  # read at call time, from the named variable
    t = AnthropicTeacher("claude-test", api.url, api_key_env="MY_KEY", max_tokens=77,
                         system_prompt="sys")
    (res,) = t.label(reqs(1))
    assert res.status == "ok" and res.explanation == GOOD and res.key == "0:50"
    req = api.requests[0]
    assert req["path"] == "/v1/messages"
    assert req["headers"]["x-api-key"] == KEY + "x"
    assert req["headers"]["anthropic-version"] == "2023-06-01"
    assert req["body"]["model"] == "claude-test" and req["body"]["max_tokens"] == 77
    assert req["body"]["system"] == "sys"
    assert [m["role"] for m in req["body"]["messages"]] == ["user"]


def test_429_twice_then_ok_honours_retry_after(api):
    api.script = [(429, {"Retry-After": "0.2"}, {"error": "slow down"}, 0)] * 2
    sleeps = []
    t = openai(api, sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    (res,) = t.label(reqs(1))
    assert res.status == "ok" and len(api.requests) == 3 and sleeps == [0.2, 0.2]


def test_retry_after_is_capped_and_backoff_grows(api):
    api.script = [(429, {"Retry-After": "100"}, {}, 0), (500, {}, {}, 0), (502, {}, {}, 0)]
    sleeps = []
    t = openai(api, retry_after_max_s=0.05, backoff_base_s=0.01, sleep=sleeps.append)
    (res,) = t.label(reqs(1))
    assert res.status == "ok" and sleeps[0] == 0.05
    assert 0.01 <= sleeps[1] <= 0.02 and 0.02 <= sleeps[2] <= 0.04  # base·2^attempt·U(0.5, 1)


def test_500_then_ok(api):
    api.script = [(500, {}, {"error": "boom"}, 0)]
    (res,) = openai(api).label(reqs(1))
    assert res.status == "ok" and len(api.requests) == 2


def test_timeout_then_ok(api):
    api.script = [(200, {}, {"choices": [{"message": {"content": GOOD}}]}, 1.5)]
    start = time.monotonic()
    (res,) = openai(api, timeout_s=0.3).label(reqs(1))
    assert res.status == "ok" and len(api.requests) == 2
    assert time.monotonic() - start < 1.2


def test_persistent_503_is_an_error_after_max_retries(api):
    api.script = [(503, {}, {"error": "down"}, 0)] * 10
    (res,) = openai(api, max_retries=2).label(reqs(1))
    assert res.status == "error" and "503" in res.error and res.explanation is None
    assert len(api.requests) == 3


def test_connection_refused_is_retried_then_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = OpenAIChatTeacher(f"http://127.0.0.1:{port}", "m", max_retries=1, backoff_base_s=0.001)
    (res,) = t.label(reqs(1))
    assert res.status == "error" and "2 attempts" in res.error


def test_400_is_an_error_without_retries_and_never_echoes_the_key(api):
    api.script = [(400, {}, {"error": f"bad request, your key was {KEY}"}, 0)]
    (res,) = openai(api).label(reqs(1))
    assert res.status == "error" and "400" in res.error and KEY not in res.error
    assert len(api.requests) == 1


def test_bad_response_shape_is_an_error(api):
    api.script = [(200, {}, {"unexpected": True}, 0)]
    (res,) = openai(api).label(reqs(1))
    assert res.status == "error" and "unexpected response shape" in res.error


@pytest.mark.parametrize("kind", ["text", "openai_refusal", "anthropic_stop_reason"])
def test_refusals(api, kind):
    if kind == "text":
        api.answer = lambda prefix: "I'm sorry, but I can't help with that request."
        (res,) = openai(api).label(reqs(1))
    elif kind == "openai_refusal":
        api.script = [(200, {}, {"choices": [{"message": {"content": None, "refusal": "No."}}]}, 0)]
        (res,) = openai(api).label(reqs(1))
    else:
        api.script = [(200, {}, {"content": [], "stop_reason": "refusal"}, 0)]
        (res,) = AnthropicTeacher("m", api.url, backoff_base_s=0.001).label(reqs(1))
    assert res.status == "refused" and res.explanation is None


def test_concurrency_limit_is_respected(api):
    api.delay = 0.1
    out = openai(api, max_concurrency=3).label(reqs(12))
    assert [r.key for r in out] == [f"{i}:50" for i in range(12)]
    assert len(api.requests) == 12 and 2 <= api.max_inflight <= 3


def test_missing_env_var_is_a_clear_error(api, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    t = openai(api)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        t.label(reqs(1))
    assert api.requests == []


def test_key_never_in_logs_reprs_or_results(api, caplog):
    caplog.set_level(logging.DEBUG)
    api.script = [(429, {}, {"error": f"key {KEY}"}, 0), (500, {}, {"echo": KEY}, 0),
                  (401, {}, {"error": f"invalid key {KEY}"}, 0)]
    for t in (openai(api), AnthropicTeacher("m", api.url, backoff_base_s=0.001)):
        out = t.label(reqs(2))
        assert KEY not in repr(t) and KEY not in str(vars(t)) and KEY not in repr(out)
    assert "retry" in caplog.text and "401" in caplog.text
    assert KEY not in caplog.text


# -- cache and resume -----------------------------------------------------------------------------

def test_cache_second_run_makes_no_calls(api, tmp_path):
    t = openai(api)
    requests = reqs(5) + [TeacherRequest("dup:60", "document 0 text {braces}")]
    first, stats = label_cached(t, requests, TeacherCache(tmp_path), chunk_size=2)
    assert len(api.requests) == 5 and stats["teacher_calls"] == 5 and stats["ok"] == 6
    assert first[-1].key == "dup:60" and first[-1].explanation == GOOD
    second, stats2 = label_cached(t, requests, TeacherCache(tmp_path), chunk_size=2)
    assert len(api.requests) == 5 and stats2["cache_hits"] == 6 and stats2["teacher_calls"] == 0
    assert second == first
    # A different judge threshold re-judges the cached raw text without calling the teacher.
    strict = openai(api, min_features=3)
    third, stats3 = label_cached(strict, requests, TeacherCache(tmp_path))
    assert stats3["too_few_features"] == 6 and len(api.requests) == 5
    # Another model is another cache key.
    label_cached(OpenAIChatTeacher(api.url, "other-model"), requests[:1], TeacherCache(tmp_path))
    assert len(api.requests) == 6
    assert teacher_metadata(t) == {"name": "openai_chat", "model": "gpt-test",
                                   "prompt_version": "v1", "min_features": 2}


def test_resume_after_server_failure_requests_only_missing_keys(api, tmp_path):
    api.script = [None] * 4 + [(503, {}, {}, 0)] * 100
    t = openai(api, max_concurrency=1, max_retries=0)
    requests = reqs(8)
    out, stats = label_cached(t, requests, TeacherCache(tmp_path), chunk_size=2)
    assert stats == {**stats, "ok": 4, "error": 4, "total": 8}
    failed = {r.key for r in out if r.status == "error"}
    api.requests.clear()
    api.script = []
    out2, stats2 = label_cached(t, requests, TeacherCache(tmp_path), chunk_size=2)
    assert {f"{p.split()[1]}:50" for p in api.prefixes} == failed
    assert stats2["ok"] == 8 and stats2["cache_hits"] == 4


def test_resume_after_kill_keeps_completed_chunks_and_tolerates_a_torn_line(api, tmp_path):
    t = openai(api)
    calls = []
    real_label = t.label

    def dying_label(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(chunk))
        return real_label(chunk)

    t.label = dying_label
    with pytest.raises(KeyboardInterrupt):
        label_cached(t, reqs(10), TeacherCache(tmp_path), chunk_size=3)
    (part,) = tmp_path.glob("*.jsonl")
    assert len(part.read_text().splitlines()) == 6
    with part.open("a") as f:
        f.write('{"hash": "abc", "status": "ok", "raw"')  # a write torn by the kill
    t.label = real_label
    api.requests.clear()
    cache = TeacherCache(tmp_path)
    assert len(cache) == 6 and cache.bad_lines == 1
    out, stats = label_cached(t, reqs(10), cache, chunk_size=3)
    assert sorted(api.prefixes) == sorted(r.prefix for r in reqs(4, start=6))
    assert stats["ok"] == 10 and [r.key for r in out] == [r.key for r in reqs(10)]
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # a new run never appends to a torn file


def test_status_counts():
    from nla_rl.data.teachers import TeacherResult
    rs = [TeacherResult("a", "x", "ok"), TeacherResult("b", None, "error", error="e")]
    assert status_counts(rs) == {"total": 2, "ok": 1, "refused": 0, "too_few_features": 0, "error": 1}


# -- local transformers teacher -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nla_rl.testing.tiny import build_tiny_model
    path = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_model("qwen2", path)
    return path


def test_local_teacher_mechanics(tiny_dir, tmp_path):
    t = LocalTeacher(tiny_dir, max_new_tokens=8, batch_size=2, dtype="float32", device="cpu",
                     min_features=1)
    assert isinstance(t, Teacher)
    requests = [TeacherRequest(f"d:{i}", "the red cat sits " * (i + 1)) for i in range(5)]
    out = t.label(requests)
    assert [r.key for r in out] == [r.key for r in requests]
    assert all(r.status in ("ok", "too_few_features", "refused") and r.raw is not None for r in out)
    assert all((r.explanation is not None) == (r.status == "ok") for r in out)
    again = LocalTeacher(tiny_dir, max_new_tokens=8, batch_size=2, dtype="float32", device="cpu",
                         min_features=1).label(requests)
    assert [r.raw for r in again] == [r.raw for r in out]  # greedy is deterministic
    sampled = [LocalTeacher(tiny_dir, max_new_tokens=8, batch_size=3, dtype="float32",
                            device="cpu", temperature=1.0, seed=7).label(requests) for _ in range(2)]
    assert [r.raw for r in sampled[0]] == [r.raw for r in sampled[1]]  # seeded sampling too
    cached, stats = label_cached(t, requests, TeacherCache(tmp_path))
    assert [r.raw for r in cached] == [r.raw for r in out] and stats["teacher_calls"] == 5


def test_local_teacher_rejects_a_bad_dtype(tiny_dir):
    with pytest.raises(ConfigError, match="dtype"):
        LocalTeacher(tiny_dir, dtype="float17").label([TeacherRequest("k", "text")])


def test_the_recipes_prompt_reaches_the_teacher_and_its_cache_key(api):
    """data.{teacher,ar_teacher}.prompt: the built teacher sends it (the prefix in place of
    {prefix}) and keys its cache by it; empty is the published prompt."""
    from launch.datagen import _build_teacher
    from nla_rl.config import ARTeacherConfig, TeacherConfig
    from nla_rl.data.teachers.base import PROMPT_VERSION

    published = _build_teacher(TeacherConfig(kind="openai", model="gpt-test",
                                              base_url=api.url + "/v1"))
    assert published.prompt_version == PROMPT_VERSION
    fuller = _build_teacher(ARTeacherConfig(kind="openai", model="gpt-ar", base_url=api.url + "/v1",
                                            prompt="Name every feature.\n<text>\n{prefix}\n</text>"))
    assert fuller.prompt_version.startswith("custom-")
    fuller.label(reqs(1))
    sent = api.requests[0]["body"]["messages"][-1]["content"]
    assert sent == "Name every feature.\n<text>\ndocument 0 text {braces}\n</text>"
