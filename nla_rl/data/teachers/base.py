"""The teacher interface: requests, results, the default prompt, answer cleaning and the cache.

A teacher is an LLM shown a document's text prefix up to a position and asked for the 2–3 most
important features of what the subject model is processing there (NLA_REFERENCE §6). Its answer is
cleaned into short paragraphs, one feature each; refusals and answers with fewer than
``min_features`` paragraphs are kept as results with a non-``ok`` status (callers drop those rows).

:func:`label_cached` is the driver every dataset build uses: it looks results up in a
:class:`TeacherCache` keyed by a hash of (teacher name, model, prompt version, prefix), sends only
the missing prefixes to the teacher, chunk by chunk, and appends each finished chunk to disk, so a
killed run keeps its completed chunks and a rerun only pays for what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

log = logging.getLogger(__name__)

Status = Literal["ok", "refused", "too_few_features", "error"]
STATUSES: tuple[str, ...] = ("ok", "refused", "too_few_features", "error")

#: Version of :data:`DEFAULT_PROMPT` (and of :func:`clean_explanation`'s output); part of every
#: cache key, so bump it whenever either changes meaningfully.
PROMPT_VERSION = "v1"

#: The default instruction: a single user message; ``{prefix}`` is replaced by the text prefix
#: (which ends with the token at the labelled position). Asks for 2–3 features, one short paragraph
#: each, ≈80–100 words in all, without markdown, so cleaning rarely has to do much.
DEFAULT_PROMPT = (
    "You are helping to interpret a language model. It has read the text below, up to and "
    "including its last token, and is about to predict the next token.\n\n"
    "<text>\n{prefix}\n</text>\n\n"
    "Describe the 2-3 most important features of what the model is processing at the last "
    "token: for example the local syntax and the kind of token likely to come next, the topic, "
    "genre and tone of the document, and the entities, facts or reasoning it must keep track of. "
    "Write one short paragraph per feature, about 80-100 words in total. Use plain prose: no "
    "headings, bullet points, numbering or introduction."
)


@dataclass(frozen=True)
class TeacherRequest:
    """One prefix to label; ``key`` is a stable id such as ``f"{doc_id}:{position}"``."""

    key: str
    prefix: str


@dataclass(frozen=True)
class TeacherResult:
    """The teacher's answer for one request: ``explanation`` is set only when status is ``ok``."""

    key: str
    explanation: str | None
    status: Status
    raw: str | None = None
    error: str | None = None


@runtime_checkable
class Teacher(Protocol):
    """Anything that labels prefixes. ``name``, ``model`` and ``prompt_version`` form the cache key."""

    name: str
    model: str
    prompt_version: str
    min_features: int

    def label(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        """One result per request, in request order; failures are ``error`` results, not raises."""
        ...


def render_prompt(prefix: str, prompt: str = DEFAULT_PROMPT) -> str:
    """The user message for ``prefix`` (plain replacement: braces in the text are left alone)."""
    return prompt.replace("{prefix}", prefix)


def prompt_version_for(prompt: str, system_prompt: str | None) -> str:
    """:data:`PROMPT_VERSION` for the default prompt; a content hash for a custom one."""
    if prompt == DEFAULT_PROMPT and system_prompt is None:
        return PROMPT_VERSION
    blob = json.dumps([prompt, system_prompt]).encode("utf-8")
    return "custom-" + hashlib.sha256(blob).hexdigest()[:12]


_REFUSAL_START = re.compile(
    r"^\s*(i\s+can['’]?t|i\s+cannot|i\s+can\s+not|i['’]?m\s+(sorry|unable|not\s+able)|"
    r"i\s+am\s+(sorry|unable|not\s+able)|i\s+apologi[sz]e|i\s+won['’]?t|i\s+will\s+not|"
    r"sorry,|unfortunately,?\s+i)",
    re.IGNORECASE,
)
_REFUSAL_ANYWHERE = re.compile(r"\bas\s+an?\s+(ai|language\s+model)\b", re.IGNORECASE)
_EXPLANATION_TAG = re.compile(r"<explanation>(.*?)(?:</explanation>|$)", re.DOTALL | re.IGNORECASE)
_ITEM = re.compile(r"^\s*(?:[-*•+–]\s+|\(?\d{1,2}[.):]\s+)")
_LABEL = re.compile(r"^(?:feature|point)\s*\d*\s*[:.\-–]\s*", re.IGNORECASE)


def clean_explanation(raw: str | None, min_features: int = 2) -> tuple[str | None, Status]:
    """Turn a raw answer into short paragraphs, one feature each, and judge it.

    Markdown headings and intro lines ending in ``:`` are dropped; bullets, numbering, ``**``/``__``
    emphasis and "Feature 1:" labels are stripped; each bullet or blank-line-separated block becomes
    one single-line paragraph. Returns ``(text, "ok")`` with paragraphs joined by a blank line, or
    ``(None, "refused")`` / ``(None, "too_few_features")``.
    """
    text = (raw or "").strip()
    tagged = _EXPLANATION_TAG.search(text)
    if tagged:
        text = tagged.group(1).strip()
    paragraphs: list[list[str]] = []
    new_block = True
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or re.fullmatch(r"[-*_=]{3,}", stripped):
            new_block = True
            continue
        item = _ITEM.match(stripped)
        if item:
            stripped = stripped[item.end():]
        stripped = _LABEL.sub("", stripped.replace("**", "").replace("__", "")).strip()
        if not stripped:
            continue
        if new_block or item:
            paragraphs.append([])
        paragraphs[-1].append(stripped)
        new_block = False
    cleaned = [" ".join(" ".join(p).split()) for p in paragraphs]
    cleaned = [p for p in cleaned if not (p.endswith(":") and len(p) < 120)]
    if (cleaned and _REFUSAL_START.match(cleaned[0])) or _REFUSAL_ANYWHERE.search(text):
        return None, "refused"
    if len(cleaned) < max(min_features, 1):
        return None, "too_few_features"
    return "\n\n".join(cleaned), "ok"


def result_from_raw(key: str, raw: str | None, min_features: int = 2) -> TeacherResult:
    """A :class:`TeacherResult` for a successfully received answer ``raw``."""
    text, status = clean_explanation(raw, min_features)
    return TeacherResult(key=key, explanation=text, status=status, raw=raw)


def _from_record(key: str, rec: dict, min_features: int) -> TeacherResult:
    """A cached answer, re-judged (a refusal signalled by the API, not the text, stays refused)."""
    res = result_from_raw(key, rec.get("raw"), min_features)
    if rec.get("status") == "refused" and res.status != "refused":
        res = TeacherResult(key=key, explanation=None, status="refused", raw=rec.get("raw"))
    return res


def status_counts(results: Sequence[TeacherResult]) -> dict[str, int]:
    """``{"total", "ok", "refused", "too_few_features", "error"}`` for the dataset sidecar."""
    counts = {"total": len(results), **{s: 0 for s in STATUSES}}
    for r in results:
        counts[r.status] += 1
    return counts


def teacher_metadata(teacher: Teacher) -> dict:
    """The teacher fields of the dataset sidecar (never any credential)."""
    return {"name": teacher.name, "model": teacher.model, "prompt_version": teacher.prompt_version,
            "min_features": teacher.min_features}


def cache_key(teacher: Teacher, prefix: str) -> str:
    """sha256 of (teacher name, model, prompt version, prefix)."""
    blob = json.dumps([teacher.name, teacher.model, teacher.prompt_version, prefix])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TeacherCache:
    """Resumable on-disk cache of teacher answers: JSON-lines files in ``directory``.

    Every process appends to its own new file (``part-<time>-<pid>.jsonl``), one flushed and
    fsynced write per chunk, so a killed run keeps its completed chunks and its possibly torn last
    line never merges with a later run's records; unreadable lines are skipped with a warning.
    Only answers are cached (``ok``/``refused``/``too_few_features``), never ``error`` results,
    and the raw text is stored so a different ``min_features`` re-judges without new calls.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self._path: Path | None = None
        self.bad_lines = 0
        for path in sorted(self.directory.glob("*.jsonl")):
            for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
                try:
                    rec = json.loads(line)
                    self._records[rec["hash"]] = rec
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        self.bad_lines += 1
                        log.warning("teacher cache: skipping unreadable line %d of %s", lineno + 1, path)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict | None:
        """The stored record (``hash``, ``status``, ``raw``, …) or None."""
        return self._records.get(key)

    def put_many(self, records: Sequence[dict]) -> None:
        """Append ``records`` (each with a ``hash``) in one flushed, fsynced write."""
        if not records:
            return
        if self._path is None:
            self._path = self.directory / f"part-{time.time_ns()}-{os.getpid()}.jsonl"
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with self._path.open("a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self._records[r["hash"]] = r


def label_cached(teacher: Teacher, requests: Sequence[TeacherRequest], cache: TeacherCache | None,
                 *, chunk_size: int = 64) -> tuple[list[TeacherResult], dict[str, int]]:
    """Label ``requests`` through ``cache``: only missing prefixes go to the teacher, in chunks.

    Requests with the same prefix are sent once. Returns the results in request order and the
    stats: :func:`status_counts` plus ``cache_hits`` and ``teacher_calls`` (requests sent).
    """
    hashes = [cache_key(teacher, r.prefix) for r in requests]
    todo: dict[str, TeacherRequest] = {}
    for h, req in zip(hashes, requests):
        if (cache is None or h not in cache) and h not in todo:
            todo[h] = req
    fresh: dict[str, TeacherResult] = {}
    pending = list(todo.items())
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start:start + chunk_size]
        results = teacher.label([req for _, req in chunk])
        if len(results) != len(chunk):
            raise RuntimeError(f"teacher {teacher.name!r} returned {len(results)} results for "
                               f"{len(chunk)} requests; a teacher must return one per request")
        fresh.update((h, res) for (h, _), res in zip(chunk, results))
        if cache is not None:
            cache.put_many([{"hash": h, "key": res.key, "status": res.status, "raw": res.raw,
                             "teacher": teacher.name, "model": teacher.model,
                             "prompt_version": teacher.prompt_version}
                            for (h, _), res in zip(chunk, results) if res.status != "error"])
        log.info("teacher %s: labelled %d/%d new prefixes", teacher.name,
                 min(start + chunk_size, len(pending)), len(pending))
    out = []
    for h, req in zip(hashes, requests):
        if h in fresh:
            res = fresh[h]
            out.append(res if res.key == req.key else TeacherResult(**{**asdict(res), "key": req.key}))
        else:
            out.append(_from_record(req.key, cache.get(h), teacher.min_features))
    stats = status_counts(out)
    stats.update(cache_hits=len(requests) - sum(h in fresh for h in hashes), teacher_calls=len(fresh))
    return out, stats
