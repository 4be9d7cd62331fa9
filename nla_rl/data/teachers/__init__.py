"""Teachers: LLMs that label (text prefix, position) with an explanation of what the model is
processing there (NLA_REFERENCE §6).

* :mod:`.base` — :class:`TeacherRequest`, :class:`TeacherResult`, the :class:`Teacher` protocol,
  the default prompt, :func:`clean_explanation`, the resumable :class:`TeacherCache` and the
  :func:`label_cached` driver (cache lookups, chunked calls, per-status stats for the sidecar).
* :mod:`.http` — :class:`OpenAIChatTeacher` and :class:`AnthropicTeacher` (stdlib HTTP, bounded
  concurrency, retries with backoff; API keys only from the environment).
* :mod:`.local` — :class:`LocalTeacher`, an in-process transformers chat model (torch and
  transformers are imported only when it first labels).
"""

from nla_rl.data.teachers.base import (DEFAULT_PROMPT, PROMPT_VERSION, STATUSES, Teacher,
                                       TeacherCache, TeacherRequest, TeacherResult, cache_key,
                                       clean_explanation, label_cached, render_prompt,
                                       result_from_raw, status_counts, teacher_metadata)
from nla_rl.data.teachers.http import AnthropicTeacher, OpenAIChatTeacher
from nla_rl.data.teachers.local import LocalTeacher

__all__ = [
    "DEFAULT_PROMPT", "PROMPT_VERSION", "STATUSES", "Teacher", "TeacherCache", "TeacherRequest",
    "TeacherResult", "cache_key", "clean_explanation", "label_cached", "render_prompt",
    "result_from_raw", "status_counts", "teacher_metadata",
    "AnthropicTeacher", "OpenAIChatTeacher", "LocalTeacher",
]
