"""Token-budget micro-batches (learner.micro_batch_tokens): groups within the budget, every row
once, and the step's exact sums (losses, gradients, GRPO normaliser and statistics, log-probs in
the callers' order) equal to those of the whole batch."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.learner import LearnerRank
from actors.losses import LOSSES, add_stats, stat_means, stat_vector
from nla_rl.config import load_recipe
from nla_rl.grpo import PolicyLossSettings
from nla_rl.rl_batch import build_policy_batch, token_logprobs
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sft import (SFTError, av_sft_loss, build_ar_sft_batch, build_av_sft_batch,
                        micro_batches, token_budget_groups)
from nla_rl.templates import DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.tokens import marker_tokens

SPEC = InjectionSpec("replace", 8.0)
TEXTS = ["two dogs", "a calm blue ocean and many happy birds near the old red house",
         "the red cat sits near the river", "one", "many happy birds sing slowly in the tree",
         "a dog"]


def test_groups_fit_the_budget_and_hold_every_row_once():
    lengths = [5, 17, 9, 3, 12, 40, 9, 4]
    groups = token_budget_groups(lengths, 30)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    for g in groups:
        widest = max(lengths[r] for r in g)
        assert len(g) * widest <= 30 or len(g) == 1
    # Shortest first; a group closes before the row that would make rows × longest > 30
    # (4 × 9 = 36 after [3, 4, 5]); the 40-token row, over the budget, is alone.
    assert groups == [[3, 7, 0], [2, 6], [4], [1], [5]]


def test_groups_are_greedy_over_sorted_lengths():
    assert token_budget_groups([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert token_budget_groups([2, 10, 3], 9) == [[0, 2], [1]]
    assert token_budget_groups([1, 2, 3], 100) == [[0, 1, 2]]
    with pytest.raises(SFTError, match="micro-batch tokens"):
        token_budget_groups([1], 0)


def test_min_groups_halves_the_largest_group():
    """A rank with fewer micro-batches than another splits its own (each forward of a sharded
    model needs every rank), never exceeding the budget and keeping every row once."""
    lengths = [3, 4, 5, 9, 9, 12]
    assert token_budget_groups(lengths, 30) == [[0, 1, 2], [3, 4], [5]]
    assert token_budget_groups(lengths, 30, min_groups=4) == [[0, 1, 2], [3], [4], [5]]
    six = token_budget_groups(lengths, 30, min_groups=6)
    assert sorted(six) == [[r] for r in range(6)]
    with pytest.raises(SFTError, match="7 micro-batches asked of 6 rows"):
        token_budget_groups(lengths, 30, min_groups=7)


def av_batch(qwen, texts=TEXTS):
    tok = qwen.tokenizer
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    g = torch.Generator().manual_seed(0)
    return build_av_sft_batch(tok, texts, torch.randn(len(texts), qwen.d_model, generator=g),
                              marker=marker, template=DEFAULT_AV_TEMPLATE)


def loss_and_grads(model, micros, loss_fn):
    model.zero_grad()
    total, count = 0.0, 0
    for micro in micros:
        value, n = loss_fn(micro)
        value.backward()
        total, count = total + float(value.detach()), count + n
    return total, count, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_av_sft_sums_and_gradients_match_the_whole_batch(qwen):
    model = AutoModelForCausalLM.from_pretrained(qwen.path)
    batch = av_batch(qwen)
    lengths = batch.attention_mask.sum(1)
    budget = int(lengths.max()) * 2
    micros = list(micro_batches(batch, 4, max_tokens=budget))
    assert len(micros) > 1 and sum(len(m) for m in micros) == len(batch)
    for m in micros:  # padding follows each micro-batch's own rows
        assert m.input_ids.numel() <= budget and m.attention_mask[:, -1].any()
    fn = lambda m: av_sft_loss(model, m, SPEC)  # noqa: E731
    whole = loss_and_grads(model, [batch], fn)
    split = loss_and_grads(model, micros, fn)
    assert split[1] == whole[1] == batch.num_target_tokens()
    assert split[0] == pytest.approx(whole[0], rel=1e-5)
    for name, g in whole[2].items():
        assert torch.allclose(split[2][name], g, atol=1e-5, rtol=1e-4), name


def test_take_keeps_each_rows_vector_and_marker(qwen):
    batch = av_batch(qwen)
    part = batch.take([4, 1])
    assert torch.equal(part.vectors, batch.vectors[[4, 1]])
    assert torch.equal(part.marker_positions, batch.marker_positions[[4, 1]])
    assert part.input_ids.shape[1] == int(batch.attention_mask[[4, 1]].sum(1).max())
    ar = build_ar_sft_batch(qwen.tokenizer, TEXTS, torch.randn(len(TEXTS), qwen.d_model),
                            template=DEFAULT_AR_TEMPLATE)
    part = ar.take([3, 0])
    assert torch.equal(part.targets, ar.targets[[3, 0]])
    assert part.input_ids.shape[1] == int(ar.attention_mask[[3, 0]].sum(1).max())
    with pytest.raises(SFTError, match="outside a batch"):
        ar.take([len(TEXTS)])


def policy_batch(qwen, model):
    tok = qwen.tokenizer
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)
    completions = [[5, 9, 11], [7], list(range(20, 40)), [], [6, 8, 10, 12, 14], [13] * 9]
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(completions), qwen.d_model, generator=g)
    engine = [[-6.0 - 0.3 * (i % 3)] * len(c) for i, c in enumerate(completions)]
    batch = build_policy_batch([prompt] * len(completions), completions, vectors,
                               [1.0, -1.0, 0.5, 0.3, -0.5, 2.0], marker=marker,
                               pad_id=tok.pad_token_id, engine_logp=engine)
    with torch.no_grad():
        batch.old_logp = token_logprobs(model, batch, SPEC) - 0.05
    return batch, prompt, completions, vectors


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_grpo_sums_statistics_and_gradients_match_the_whole_batch(qwen, loss_agg):
    model = AutoModelForCausalLM.from_pretrained(qwen.path)
    batch, prompt, *_ = policy_batch(qwen, model)
    batch.settings = PolicyLossSettings(is_cap=2.0, mismatch_threshold=None, loss_agg=loss_agg)
    rank = SimpleNamespace(spec=SimpleNamespace(model=SimpleNamespace(injection=SPEC)))
    grpo = LOSSES["grpo"]
    budget = len(prompt) * 3 + 10
    micros = list(micro_batches(batch, 2, max_tokens=budget))
    assert len(micros) >= 3 and all(m.input_ids.numel() <= budget or len(m) == 1 for m in micros)
    assert sum(grpo.count(m) for m in micros) == grpo.count(batch)

    def run(parts):
        model.zero_grad()
        stats, total = {}, 0.0
        for part in parts:
            out = grpo.compute(rank, model, part)
            out.loss_sum.backward()
            stats, total = add_stats(stats, out.stats), total + float(out.loss_sum.detach())
        reduced = stat_means(grpo.stats, stat_vector(grpo.stats, stats))
        return total, reduced, {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, split = run([batch]), run(micros)
    assert split[0] == pytest.approx(whole[0], rel=1e-5, abs=1e-6)
    assert split[1] == pytest.approx(whole[1], rel=1e-5, abs=1e-7)
    for name, g in whole[2].items():
        assert torch.allclose(split[2][name], g, atol=1e-5, rtol=1e-4), name


def test_learner_logprob_groups_return_rows_in_the_callers_order(qwen):
    """``LearnerRank.av_logprobs`` (the old/reference passes) with a token budget: the same
    values as row micro-batches, each at its own row."""
    model = AutoModelForCausalLM.from_pretrained(qwen.path).eval()
    batch, prompt, completions, vectors = policy_batch(qwen, model)
    spec = SimpleNamespace(marker=marker_tokens(qwen.tokenizer, DEFAULT_AV_TEMPLATE, None),
                           injection=SPEC, lora=SimpleNamespace(rank=0))

    def rank_with(tokens):
        rank = LearnerRank.__new__(LearnerRank)  # the actor body, without Ray or a process group
        rank.spec = SimpleNamespace(model=spec, micro_batch_size=2, micro_batch_tokens=tokens)
        rank.backend, rank.tokenizer = SimpleNamespace(module=model), qwen.tokenizer
        rank.reference, rank.device = None, torch.device("cpu")
        return rank

    prompts = [prompt] * len(completions)
    by_rows = rank_with(None).av_logprobs(prompts, completions, vectors.numpy(), False, 0.8)
    budget = rank_with(len(prompt) * 2 + 12)
    assert [len(g) for g in budget._logprob_groups(prompts, completions)] != [2, 2, 2]
    by_tokens = budget.av_logprobs(prompts, completions, vectors.numpy(), False, 0.8)
    assert [len(x) for x in by_tokens] == [len(c) for c in completions]
    for a, b in zip(by_tokens, by_rows):
        assert torch.allclose(a, b, atol=1e-5)


def test_recipe_key(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"
    assert load_recipe(recipe).learner.micro_batch_tokens is None
    cfg = load_recipe(recipe, ["learner.micro_batch_tokens=4096"])
    assert cfg.learner.micro_batch_tokens == 4096
    with pytest.raises(Exception, match="micro_batch_tokens"):
        load_recipe(recipe, ["learner.micro_batch_tokens=0"])
