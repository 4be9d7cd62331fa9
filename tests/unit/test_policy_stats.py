"""GRPO step statistics (train/av/clip_frac, kl, …): exact weighted means over micro-batches and
ranks, as the learner reduces them (weighted sums added, all-reduced, divided once)."""

import math
from types import SimpleNamespace

import pytest
import torch

from actors.losses import (GRPO_STATS, LOSSES, add_stats, grpo_stat_sums, stat_means,
                           stat_vector)
from nla_rl.grpo import PolicyLossSettings, policy_loss
from nla_rl.rl_batch import build_policy_batch, token_logprobs
from nla_rl.roundtrip import InjectionSpec
from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
from nla_rl.tokens import marker_tokens

CLIP = PolicyLossSettings(clip_low=0.2, clip_high=0.28, mismatch_threshold=None)


def _reduce(ranks: list[list]) -> dict[str, float]:
    """What the learner does: per rank, add the micro-batches' sums; all-reduce; divide once."""
    vectors = []
    for micros in ranks:
        sums = {}
        for out, rollouts in micros:
            sums = add_stats(sums, grpo_stat_sums(out.stats, rollouts))
        vectors.append(stat_vector(GRPO_STATS, sums))
    return stat_means(GRPO_STATS, [sum(col) for col in zip(*vectors)])


def _known_ratios():
    """Rollout 0 (A = +1): one token, ρ = 1.5 > 1.28: clipped. Rollout 1 (A = -1): four tokens
    with ρ = 0.5 (< 0.8: clipped), 1.5 (A < 0: the upper bound does not bind), 0.9 and 1.0."""
    ratios = torch.tensor([[1.5, 1.0, 1.0, 1.0], [0.5, 1.5, 0.9, 1.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    old = torch.full((2, 4), -2.0)
    return old + ratios.log(), old, mask, torch.tensor([1.0, -1.0])


def test_clip_frac_on_known_ratios_is_token_weighted_over_micro_batches():
    logp, old, mask, adv = _known_ratios()
    whole = policy_loss(logp, adv, mask, CLIP, old_logp=old)
    assert _reduce([[(whole, 2)]])["clip_frac"] == pytest.approx(2 / 5)
    # Micro-batches of 1 and 4 tokens (clip fractions 1 and 1/4) on two ranks: still 2 of 5
    # tokens, not the mean of the micro-batch means (5/8).
    parts = [(policy_loss(logp[i:i + 1], adv[i:i + 1], mask[i:i + 1], CLIP, old_logp=old[i:i + 1]),
              1) for i in (0, 1)]
    assert [p.stats["policy/clip_frac_high"] + p.stats["policy/clip_frac_low"]
            for p, _ in parts] == pytest.approx([1.0, 0.25])
    means = _reduce([[parts[0]], [parts[1]]])
    assert means["clip_frac"] == pytest.approx(2 / 5)
    # No engine log-probs: IS weights are 1, nothing capped or masked; no reference: no kl.
    assert means["is_ratio_mean"] == 1.0 and means["is_capped_frac"] == 0.0
    assert means["masked_frac"] == 0.0 and "kl" not in means


def _step(seed: int, rows: int = 7, width: int = 9):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 9, 2, 6, 3, 9, 4])[:rows]  # very different token counts
    mask = torch.arange(width)[None, :] < lengths[:, None]
    noise = lambda s: s * torch.randn(rows, width, generator=gen)  # noqa: E731
    logp = -torch.nn.functional.softplus(torch.randn(rows, width, generator=gen))
    old, engine, ref = logp + noise(0.3), logp + noise(0.4), logp + noise(0.3)
    engine[3] = old[3] - 1.5  # one rollout over the mismatch threshold
    return logp, mask, old, engine, ref, torch.randn(rows, generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_over_uneven_micro_batches_and_ranks_equal_the_whole_step(seed):
    logp, mask, old, engine, ref, adv = _step(seed)
    s = PolicyLossSettings(kl_beta=0.05, is_cap=1.5, mismatch_threshold=1.0)

    def loss(p: slice):
        return policy_loss(logp[p], adv[p], mask[p], s, old_logp=old[p], engine_logp=engine[p],
                           ref_logp=ref[p]), p.stop - p.start

    whole = _reduce([[loss(slice(0, 7))]])
    assert set(whole) == set(GRPO_STATS)
    assert whole["masked_frac"] == pytest.approx(1 / 7)
    assert 0 < whole["clip_frac"] < 1 and 0 < whole["is_capped_frac"] < 1  # not vacuous
    split = _reduce([[loss(slice(0, 2)), loss(slice(2, 3))], [loss(slice(3, 4)),
                                                              loss(slice(4, 7))]])
    assert split == pytest.approx(whole, rel=1e-6, abs=1e-9)
    # A mean of per-micro-batch means weights tokens unequally, and would differ.
    micros = [loss(slice(i, i + 1))[0] for i in range(7) if i != 3]
    naive = sum(m.stats["policy/is_weight_mean"] for m in micros) / len(micros)
    assert not math.isclose(naive, whole["is_ratio_mean"], rel_tol=1e-3)


def test_zero_weight_statistics_are_left_out():
    sums = add_stats({"clip_frac": (1.0, 4.0)}, {"clip_frac": (1.0, 1.0), "kl": (0.0, 0.0)})
    assert sums == {"clip_frac": (2.0, 5.0), "kl": (0.0, 0.0)}
    vector = stat_vector(("clip_frac", "kl", "masked_frac"), sums)
    assert vector == [2.0, 5.0, 0.0, 0.0, 0.0, 0.0]
    assert stat_means(("clip_frac", "kl", "masked_frac"), vector) == {"clip_frac": 0.4}


def test_the_learner_loss_reports_its_statistics(qwen):
    """``LOSSES['grpo'].compute`` on a real model: micro-batches of 1 and 3 rollouts reduce to
    the statistics of the whole batch; at old = current log-probs nothing is clipped."""
    from transformers import AutoModelForCausalLM

    tok, model = qwen.tokenizer, AutoModelForCausalLM.from_pretrained(qwen.path).eval()
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, None)
    prompt = av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)
    completions = [[5, 9, 11], [7], [13, 14, 15, 16, 17], [6, 8]]
    torch.manual_seed(0)
    vectors = torch.randn(4, model.config.hidden_size)
    # The random model's log-probs are about -log V: weights at the cap in rows 0 and 2 only.
    engine = [[-30.0 if b % 2 == 0 else 0.0] * len(c) for b, c in enumerate(completions)]
    batch = build_policy_batch([prompt] * 4, completions, vectors, [1.0, -1.0, 0.5, -0.5],
                               marker=marker, pad_id=tok.pad_token_id, engine_logp=engine)
    injection = InjectionSpec("replace", 8.0)
    rank = SimpleNamespace(spec=SimpleNamespace(model=SimpleNamespace(injection=injection)))
    grpo = LOSSES["grpo"]
    with torch.no_grad():
        batch.old_logp = token_logprobs(model, batch, injection).masked_fill(
            ~batch.response_mask, 0.0)  # the first epoch: old = current
        batch.settings = PolicyLossSettings(is_cap=2.0, mismatch_threshold=None)
        whole = grpo.compute(rank, model, batch)
        parts = [grpo.compute(rank, model, batch.slice(a, b)) for a, b in ((0, 1), (1, 4))]
    assert grpo.stats == GRPO_STATS and whole.count == sum(map(len, completions))
    assert [p.count for p in parts] == [3, 8]
    reduce = lambda sums: stat_means(grpo.stats, stat_vector(grpo.stats, sums))  # noqa: E731
    split = reduce(add_stats(parts[0].stats, parts[1].stats))
    assert split == pytest.approx(reduce(whole.stats), rel=1e-5, abs=1e-7)
    assert split["clip_frac"] == 0.0 and split["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert split["masked_frac"] == 0.0
    assert split["is_capped_frac"] == pytest.approx((3 + 5) / 11)  # rows 0 and 2 of 11 tokens
