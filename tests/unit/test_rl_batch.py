"""Policy batches: alignment of per-token log-probs, micro-batch exactness, bad input."""

import pytest
import torch

from nla_rl.errors import InjectionError, NLAError
from nla_rl.grpo import PolicyLossSettings
from nla_rl.injection import inject
from nla_rl.rl_batch import build_policy_batch, grpo_micro_loss, token_logprobs, trim_at_eos
from nla_rl.roundtrip import InjectionSpec
from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.tokens import marker_tokens

SPEC = InjectionSpec("replace", 8.0)
SETTINGS = PolicyLossSettings(clip_low=0.2, clip_high=0.28, kl_beta=0.0, kl_estimator="k3",
                              is_cap=2.0, mismatch_threshold=None, loss_agg="token_mean")


@pytest.fixture
def setup(qwen):
    from transformers import AutoModelForCausalLM

    # A private copy: one test takes an optimiser step, and the session's model is shared.
    tok, model = qwen.tokenizer, AutoModelForCausalLM.from_pretrained(qwen.path).eval()
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)
    torch.manual_seed(0)
    completions = [[5, 9, 11], [7], [13, 14, 15, 16, 17], []]
    vectors = torch.randn(4, model.config.hidden_size)
    return tok, model, marker, prompt, completions, vectors


def test_token_logprobs_match_unpadded_single_rows(setup):
    tok, model, marker, prompt, completions, vectors = setup
    batch = build_policy_batch([prompt] * 4, completions, vectors, [1.0, -1.0, 0.5, 0.0],
                               marker=marker, pad_id=tok.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(model, batch, SPEC, temperature=0.7)
    for b, c in enumerate(completions):
        ids = torch.tensor([prompt + c])
        pos = torch.tensor([[0, prompt.index(marker.token_id)]])
        with torch.no_grad(), inject(model, family="replace", vectors=vectors[b:b + 1],
                                     positions=pos, scale=8.0):
            ref = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float() / 0.7, -1)
        ref = ref.gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1:]
        got = logp[b][batch.response_mask[b]]
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert int(batch.response_mask.sum()) == sum(map(len, completions))


def test_micro_batches_sum_to_the_whole_batch(setup):
    tok, model, marker, prompt, completions, vectors = setup
    engine = [[-1.0] * len(c) for c in completions]
    batch = build_policy_batch([prompt] * 4, completions, vectors, [1.0, -1.0, 0.5, 2.0],
                               marker=marker, pad_id=tok.pad_token_id, engine_logp=engine)
    whole = grpo_micro_loss(model, batch, SPEC, SETTINGS)
    parts = [grpo_micro_loss(model, batch.slice(i, i + 2), SPEC, SETTINGS) for i in (0, 2)]
    assert torch.allclose(whole.loss_sum, sum(p.loss_sum for p in parts), atol=1e-5)
    assert whole.normalizer == sum(p.normalizer for p in parts) == sum(map(len, completions))


def test_a_positive_advantage_raises_the_completions_probability(setup):
    tok, model, marker, prompt, completions, vectors = setup
    batch = build_policy_batch([prompt], [completions[0]], vectors[:1], [1.0], marker=marker,
                               pad_id=tok.pad_token_id)
    before = token_logprobs(model, batch, SPEC)[batch.response_mask].sum().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = grpo_micro_loss(model, batch, SPEC, SETTINGS)
    (loss.loss_sum / loss.normalizer).backward()
    opt.step()
    after = token_logprobs(model, batch, SPEC)[batch.response_mask].sum().item()
    assert after > before


def test_bad_input(setup):
    tok, model, marker, prompt, completions, vectors = setup
    with pytest.raises(InjectionError, match="anchored marker"):
        build_policy_batch([prompt[:5]], [[1]], vectors[:1], [0.0], marker=marker, pad_id=0)
    with pytest.raises(NLAError, match="2 log-probs for 3 completion tokens"):
        build_policy_batch([prompt], [[1, 2, 3]], vectors[:1], [0.0], marker=marker, pad_id=0,
                           engine_logp=[[-1.0, -1.0]])
    with pytest.raises(NLAError, match="must match"):
        build_policy_batch([prompt] * 2, [[1]], vectors[:2], [0.0, 0.0], marker=marker, pad_id=0)


def test_trim_at_eos():
    assert trim_at_eos([4, 5, 2, 7, 2], {2}) == [4, 5, 2]
    assert trim_at_eos([4, 5], {2}) == [4, 5]
    assert trim_at_eos([], {2}) == []
