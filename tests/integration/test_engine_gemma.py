"""Gemma-3 ``replace`` injection through vLLM prompt embeddings: Gemma's embedding module multiplies
token embeddings by √d, vLLM applies that multiplier to token ids only, so the engine must build
the ordinary rows already multiplied and leave the injected row as it is."""

from __future__ import annotations

import pytest

from rollout.base import SamplingSpec, make_engine
from tests.integration._engine_setup import (ENGINE_KWARGS, INJECTIONS, build_model, make_requests,
                                             marker_of, max_abs_diff)

pytest.importorskip("vllm")
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    model, tok = build_model(root / "model", family="gemma3", init_std=0.1)
    marker = marker_of(tok)
    common = dict(model_dir=str(root / "model"), marker=marker, injection=INJECTIONS["replace"])
    vllm = make_engine("vllm", **common, **ENGINE_KWARGS)
    yield {"hf": make_engine("hf", **common), "vllm": vllm,
           "requests": make_requests(tok, marker, model.config.hidden_size)}
    vllm.close()


def test_gemma_replace_parity(gemma):
    reqs = gemma["requests"]
    ref, got = gemma["hf"].generate(reqs, GREEDY), gemma["vllm"].generate(reqs, GREEDY)
    assert [g[0].token_ids for g in got] == [r[0].token_ids for r in ref]
    assert max_abs_diff([g[0].logprobs for g in got], [r[0].logprobs for r in ref]) < 1e-4
    assert len({tuple(g[0].token_ids) for g in got}) > 1


def test_gemma_without_the_multiplier_would_differ(gemma):
    """The control: prompt embeddings without √d give other log-probs (the parity check is sensitive)."""
    reqs, engine = gemma["requests"][:2], gemma["vllm"]
    good = [g[0].logprobs[:1] for g in engine.generate(reqs, GREEDY)]
    multiplier, engine._multiplier = engine._multiplier, 1.0
    try:
        bad = [g[0].logprobs[:1] for g in engine.generate(reqs, GREEDY)]
    finally:
        engine._multiplier = multiplier
    assert max_abs_diff(bad, good) > 1e-2
