"""Teachers behind an HTTP API: OpenAI-compatible chat completions and Anthropic messages.

Standard library only (``urllib``). Each request runs in a thread pool of ``max_concurrency``
workers and is retried with exponential backoff and jitter on 408/409/429, 5xx, timeouts and
connection errors and non-JSON bodies, honouring ``Retry-After`` (capped at
``retry_after_max_s``). Any other 4xx, JSON of an unexpected shape, or running out of retries
gives an ``error`` result for that row; the run goes on.

The API key is read from the environment variable ``api_key_env`` when :meth:`label` is called.
It is never stored on the object, never logged, and scrubbed from every error message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from nla_rl.data.teachers.base import (DEFAULT_PROMPT, TeacherRequest, TeacherResult,
                                       prompt_version_for, render_prompt, result_from_raw)
from nla_rl.errors import ConfigError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_RETRY_EXC = (TimeoutError, ConnectionError, urllib.error.URLError, http.client.HTTPException)


class _HTTPStatusError(Exception):
    def __init__(self, code: int, body: str, retry_after: str | None):
        super().__init__(f"HTTP {code}: {body}")
        self.code, self.retry_after = code, retry_after


class _HTTPTeacher:
    """Shared machinery; subclasses set ``name``, ``_path`` and the body/header/parse hooks."""

    name = "http"
    _path = ""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None,
                 max_concurrency: int = 8, max_retries: int = 5, timeout_s: float = 60.0,
                 temperature: float | None = 0.0, max_tokens: int = 400,
                 prompt: str = DEFAULT_PROMPT, system_prompt: str | None = None,
                 min_features: int = 2, backoff_base_s: float = 1.0, backoff_max_s: float = 30.0,
                 retry_after_max_s: float = 60.0, sleep: Callable[[float], None] = time.sleep):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ConfigError(f"{type(self).__name__}: need max_concurrency ≥ 1, max_retries ≥ 0 "
                              f"and timeout_s > 0; found {max_concurrency}, {max_retries}, {timeout_s}")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.max_concurrency, self.max_retries, self.timeout_s = max_concurrency, max_retries, timeout_s
        self.temperature, self.max_tokens = temperature, max_tokens
        self.prompt, self.system_prompt, self.min_features = prompt, system_prompt, min_features
        self.prompt_version = prompt_version_for(prompt, system_prompt)
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.retry_after_max_s, self._sleep = retry_after_max_s, sleep
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    # -- hooks -------------------------------------------------------------------------------
    def _headers(self, api_key: str | None) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, user: str) -> dict:
        raise NotImplementedError

    def _parse(self, key: str, payload: dict) -> TeacherResult:
        raise NotImplementedError

    # -- driver ------------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"{type(self).__name__}: the API key environment variable {self.api_key_env} is "
                f"not set or empty. Export {self.api_key_env}=<key>, or pass api_key_env= naming "
                f"the variable that holds it (api_key_env=None for a server without auth).")
        return key

    def label(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """One result per request, in order; at most ``max_concurrency`` requests in flight."""
        api_key = self._api_key()
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests)),
                                thread_name_prefix=f"teacher-{self.name}") as pool:
            return list(pool.map(lambda r: self._label_one(r, api_key), requests))

    def _label_one(self, req: TeacherRequest, api_key: str | None) -> TeacherResult:
        data = json.dumps(self._body(render_prompt(req.prefix, self.prompt))).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": "nla-rl",
                   **self._headers(api_key)}
        url = self.base_url + self._path
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                payload = self._post(url, data, headers)
            except _HTTPStatusError as e:
                msg = _scrub(str(e), api_key)
                if e.code not in RETRY_STATUSES:
                    return self._error(req.key, msg)
                retry_after = _parse_retry_after(e.retry_after)
            except _RETRY_EXC as e:
                msg = _scrub(f"{type(e).__name__}: {e}", api_key)
            else:
                try:
                    return self._parse(req.key, payload)
                except (KeyError, IndexError, TypeError, AttributeError) as e:
                    return self._error(req.key, _scrub(f"unexpected response shape ({e!r}): "
                                                       f"{json.dumps(payload)[:300]}", api_key))
            if attempt == self.max_retries:
                return self._error(req.key, f"gave up after {attempt + 1} attempts: {msg}")
            delay = (min(retry_after, self.retry_after_max_s) if retry_after is not None else
                     min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt)
                     * random.uniform(0.5, 1.0))
            log.warning("teacher %s: request %s failed (%s); retry %d/%d in %.2fs",
                        self.name, req.key, msg, attempt + 1, self.max_retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, url: str, data: bytes, headers: dict[str, str]) -> dict:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()[:300].decode("utf-8", errors="replace") if e.fp else ""
            raise _HTTPStatusError(e.code, body, e.headers.get("Retry-After") if e.headers else None)
        try:
            return json.loads(raw)
        except ValueError:
            raise http.client.HTTPException(f"response is not JSON: {raw[:200]!r}") from None

    def _error(self, key: str, message: str) -> TeacherResult:
        log.warning("teacher %s: request %s failed: %s", self.name, key, message)
        return TeacherResult(key=key, explanation=None, status="error", error=message)


class OpenAIChatTeacher(_HTTPTeacher):
    """``POST {base_url}/chat/completions`` (OpenAI, vLLM, llama.cpp, … servers).

    ``base_url`` includes the version prefix, e.g. ``https://api.openai.com/v1``. Sends
    ``Authorization: Bearer $api_key_env``; a non-null ``message.refusal`` gives ``refused``.
    """

    name = "openai_chat"
    _path = "/chat/completions"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 **kwargs):
        super().__init__(base_url, model, api_key_env=api_key_env, **kwargs)

    def _headers(self, api_key):
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _body(self, user):
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        body = {"model": self.model, "messages": messages + [{"role": "user", "content": user}],
                "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def _parse(self, key, payload):
        message = payload["choices"][0]["message"]
        if message.get("refusal"):
            return TeacherResult(key=key, explanation=None, status="refused", raw=message["refusal"])
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return result_from_raw(key, content, self.min_features)


class AnthropicTeacher(_HTTPTeacher):
    """``POST {base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version: 2023-06-01``.

    The text blocks of ``content`` are joined; ``stop_reason == "refusal"`` gives ``refused``.
    """

    name = "anthropic"
    _path = "/v1/messages"

    def __init__(self, model: str, base_url: str = "https://api.anthropic.com", *,
                 api_key_env: str | None = "ANTHROPIC_API_KEY", **kwargs):
        super().__init__(base_url, model, api_key_env=api_key_env, **kwargs)

    def _headers(self, api_key):
        headers = {"anthropic-version": "2023-06-01"}
        return {**headers, "x-api-key": api_key} if api_key else headers

    def _body(self, user):
        body = {"model": self.model, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": user}]}
        if self.system_prompt:
            body["system"] = self.system_prompt
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return body

    def _parse(self, key, payload):
        text = "".join(b["text"] for b in payload["content"] if b.get("type", "text") == "text")
        if payload.get("stop_reason") == "refusal":
            return TeacherResult(key=key, explanation=None, status="refused", raw=text)
        return result_from_raw(key, text, self.min_features)


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced (error bodies may echo headers)."""
    return text.replace(secret, "***") if secret else text
