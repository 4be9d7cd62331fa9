"""EngineSpec: the typed description an engine (and its replacement) is built from."""

from pathlib import Path

import pytest

from nla_rl.injection import InjectionSpec
from nla_rl.tokens import MarkerTokens
from rollout.base import EngineSpec

MARKER = MarkerTokens("x", 7, 3, 9)
INJECTION = InjectionSpec("replace", 2.0)


def test_engine_kwargs_are_what_the_engines_took_before():
    spec = EngineSpec(kind="hf", model_dir="/m", marker=MARKER, injection=INJECTION, seed=3,
                      lora_rank=4, max_model_len=64)
    assert spec.engine_kwargs() == dict(
        model_dir="/m", marker=MARKER, injection=INJECTION, dtype="float32", seed=3,
        max_model_len=64, lora_rank=4, kv_cache_gib=1.0, gpu_memory_utilization=0.5)
    tp = EngineSpec(kind="vllm", model_dir="/m", marker=MARKER, injection=INJECTION,
                    tensor_parallel_size=2)
    assert tp.engine_kwargs()["tensor_parallel_size"] == 2  # only when > 1: hf has none


def test_from_kwargs_types_the_known_keywords_and_keeps_the_rest():
    spec = EngineSpec.from_kwargs("vllm", model_dir=Path("/m"), marker=MARKER, injection=INJECTION,
                                  dtype="bfloat16", enforce_eager=False)
    assert spec.model_dir == "/m" and spec.dtype == "bfloat16" and spec.kind == "vllm"
    assert spec.extra == {"enforce_eager": False}
    assert spec.engine_kwargs()["enforce_eager"] is False


def test_a_spec_needs_model_marker_and_injection():
    with pytest.raises(TypeError):
        EngineSpec(kind="hf", model_dir="/m")  # type: ignore[call-arg]
