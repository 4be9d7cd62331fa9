import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nla_rl.config import NegativesConfig, RLConfig
from nla_rl.errors import NLAError
from nla_rl.rewards import (combined_reward, contrastive_infonce, contrastive_max,
                            failure_penalty, mse_scale_for, normalized_mse)
from nla_rl.rl_rewards import (hinge_length_penalty, length_thresholds, resolve_penalty,
                               response_lengths, step_rewards)

D, EOS, PAD = 16, 2, 0
SCALE = mse_scale_for(D)
METRICS = ("reward/mean", "reward/std", "reward/mse", "reward/failure_rate",
           "reward/length_capped_rate", "reward/gap", "reward/top1", "rollout/mean_tokens")


def _batch(n=8, seed=0, noise=0.5):
    gen = torch.Generator().manual_seed(seed)
    gold = torch.randn(n, D, generator=gen)
    pred = gold + noise * torch.randn(n, D, generator=gen)
    return pred, gold


def _ids(lengths, width=48):
    """Padded rollouts: random non-EOS tokens, EOS at position n-1, then padding."""
    rows = []
    for n in lengths:
        row = torch.full((width,), PAD)
        row[:n] = 5
        if n < width:
            row[n - 1] = EOS
        rows.append(row)
    return torch.stack(rows)


def _rewards(pred, gold, lengths=None, finish=None, rl=None, **kw):
    n = gold.shape[0]
    lengths = [10] * n if lengths is None else lengths
    finish = finish or ["stop"] * n
    return step_rewards(pred, gold, _ids(lengths), finish, rl or RLConfig(), scale=SCALE,
                        eos_token_ids=EOS, pad_token_id=PAD, **kw)


def test_plain_reward_is_minus_mse_and_metrics_are_named():
    pred, gold = _batch()
    out = _rewards(pred, gold)
    mse = normalized_mse(pred, gold, SCALE)
    torch.testing.assert_close(out.rewards, -mse)  # 10 tokens: under the hinge
    assert set(METRICS) <= set(out.metrics)
    assert out.metrics["reward/mse"] == pytest.approx(float(mse.mean()))
    assert out.metrics["reward/mean"] == pytest.approx(float(-mse.mean()))
    assert out.metrics["rollout/mean_tokens"] == 10 and out.metrics["reward/failure_rate"] == 0
    assert math.isnan(out.metrics["reward/gap"])  # no negatives given
    log = _rewards(pred, gold, rl=RLConfig(reward="neg_log_mse"))
    torch.testing.assert_close(log.rewards, -torch.log(mse))


def test_length_capped_and_unextracted_rollouts_get_the_penalty_and_stay_in_the_loss():
    pred, gold = _batch()
    preds = list(pred)
    preds[3] = None  # no </explanation>
    finish = ["stop"] * 8
    finish[5] = "length"
    finish[6] = "abort"
    out = _rewards(preds, gold, lengths=[10, 10, 10, 10, 10, 48, 10, 10], finish=finish)
    penalty = failure_penalty("neg_mse")
    assert out.rewards[[3, 5, 6]].tolist() == [penalty] * 3
    assert out.failed.tolist() == [False, False, False, True, False, True, True, False]
    assert out.keep.tolist() == [True] * 6 + [False, True]  # only the aborted rollout leaves
    assert out.metrics["reward/length_capped_rate"] == pytest.approx(1 / 8)
    assert out.metrics["reward/failure_rate"] == pytest.approx(3 / 8)
    custom = _rewards(preds, gold, finish=finish, rl=RLConfig(failure_penalty=-5.0))
    assert custom.rewards[[3, 5, 6]].tolist() == [-5.0] * 3
    assert resolve_penalty(RLConfig(reward="neg_log_mse")) == pytest.approx(-math.log(2))


def test_eos_trimming_decides_the_length_penalty():
    padded = _ids([10, 40])
    assert response_lengths(padded, EOS).tolist() == [10, 40]
    unpadded = [padded[0, :10].tolist(), padded[1, :40].tolist()]
    assert response_lengths(unpadded, [EOS, 99]).tolist() == [10, 40]
    no_eos = torch.full((2, 48), 5)
    no_eos[1, 30:] = PAD
    assert response_lengths(no_eos, EOS, pad_token_id=PAD).tolist() == [48, 30]
    # The same rollouts padded to the group maximum, without an EOS to trim at, would all be
    # charged for 48 tokens and the penalty would cancel inside the group.
    pred, gold = _batch(4)
    rl = RLConfig()
    trimmed = step_rewards(pred, gold, _ids([10, 20, 36, 40]), ["stop"] * 4, rl, scale=SCALE,
                           eos_token_ids=EOS)
    base = -normalized_mse(pred, gold, SCALE)
    threshold = rl.max_new_tokens - rl.length_penalty_margin
    expected = torch.tensor([max(0, n - threshold) for n in (10, 20, 36, 40)]) * 0.01
    torch.testing.assert_close(base - trimmed.rewards, expected.float())
    assert trimmed.metrics["rollout/mean_tokens"] == pytest.approx(26.5)


@given(st.lists(st.integers(1, 48), min_size=1, max_size=16), st.floats(0.0, 0.1),
       st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_hinge_penalty_values(lengths, coef, margin):
    rl = RLConfig(length_penalty_coef=coef, length_penalty_margin=margin)
    groups = torch.zeros(len(lengths), dtype=torch.long)
    penalty = hinge_length_penalty(torch.tensor(lengths), length_thresholds(groups, rl), coef)
    for n, p in zip(lengths, penalty.tolist()):
        over = n - (48 - margin)
        assert p == pytest.approx(coef * over if over > 0 else 0.0, abs=1e-6)
    assert bool((penalty >= 0).all())


def test_random_length_budget_is_per_group_and_seeded():
    rl = RLConfig(random_length_budget=True, length_budget_min=4, length_penalty_margin=8)
    groups = torch.arange(64).repeat_interleave(4)
    first = length_thresholds(groups, rl, seed=7, step=3)
    torch.testing.assert_close(first, length_thresholds(groups, rl, seed=7, step=3))
    assert not torch.equal(first, length_thresholds(groups, rl, seed=7, step=4))
    per_group = first.reshape(64, 4)
    assert bool((per_group == per_group[:, :1]).all())  # one budget per group
    assert float(first.min()) >= 4 and float(first.max()) <= 40
    assert len(set(per_group[:, 0].tolist())) > 5  # really drawn, not a constant
    pred, gold = _batch(8)
    out = _rewards(pred, gold, lengths=[40] * 8, rl=rl, seed=7, step=3)
    expected_pen = 0.01 * torch.clamp(40 - length_thresholds(torch.arange(8) // 4, rl, 7, 3), min=0)
    torch.testing.assert_close(-normalized_mse(pred, gold, SCALE) - out.rewards, expected_pen)


def _negatives_towards(gold, distances):
    """One negative per rollout at cosine-distance ``d`` from the gold (farther = larger d)."""
    gen = torch.Generator().manual_seed(5)
    away = torch.randn(gold.shape, generator=gen)
    return torch.stack([gold[i] + d * away[i] for i, d in enumerate(distances)]).unsqueeze(1)


@pytest.mark.parametrize("combine", ["max", "infonce"])
def test_hard_negative_term_rewards_distance_from_the_negatives(combine):
    gold = _batch(4)[1][:1].repeat(4, 1)
    pred = gold + 0.3 * torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    pred = pred[:1].repeat(4, 1)  # same prediction and gold: only the negatives differ
    negs = _negatives_towards(gold, [0.2, 0.5, 1.0, 3.0])
    cfg = NegativesConfig(enabled=True, combine=combine, weight=0.5, per_sample=1)
    out = _rewards(pred, gold, negatives_cfg=cfg, hard_negatives=negs)
    assert bool((out.rewards[1:] > out.rewards[:-1]).all())  # farther negatives, higher reward
    fn = contrastive_max if combine == "max" else contrastive_infonce
    extra = {"tau": cfg.temperature} if combine == "infonce" else {}
    base = -normalized_mse(pred, gold, SCALE)
    torch.testing.assert_close(out.rewards, combined_reward(base, fn(pred, gold, negs, SCALE,
                                                                     **extra), 0.5))
    assert math.isfinite(out.metrics["reward/gap"]) and 0 <= out.metrics["reward/top1"] <= 1


def test_max_and_infonce_agree_on_which_prediction_is_better():
    pred, gold = _batch(8, seed=3, noise=0.1)
    negs = torch.randn(8, 3, D, generator=torch.Generator().manual_seed(4))
    good, bad = pred, pred + 3.0 * torch.randn(8, D, generator=torch.Generator().manual_seed(9))
    for combine in ("max", "infonce"):
        cfg = NegativesConfig(enabled=True, combine=combine, weight=1.0)
        r_good = _rewards(good, gold, negatives_cfg=cfg, hard_negatives=negs).rewards
        r_bad = _rewards(bad, gold, negatives_cfg=cfg, hard_negatives=negs).rewards
        assert bool((r_good > r_bad).all()), combine


def test_non_finite_predictions_are_floored_at_the_penalty():
    pred, gold = _batch(4)
    pred[1, 0] = float("nan")
    pred[2, 3] = float("inf")
    cfg = NegativesConfig(enabled=True, per_sample=2)
    negs = torch.randn(4, 2, D)
    out = _rewards(pred, gold, negatives_cfg=cfg, hard_negatives=negs)
    assert bool(torch.isfinite(out.rewards).all())
    assert out.rewards[1:3].tolist() == [failure_penalty("neg_mse")] * 2
    assert out.failed.tolist() == [False, True, True, False] and bool(out.keep.all())
    assert out.metrics["reward/nonfinite_rate"] == 0.5
    assert all(math.isfinite(out.metrics[k]) for k in METRICS)


def test_reward_input_errors():
    pred, gold = _batch(4)
    with pytest.raises(NLAError, match="finish reasons"):
        _rewards(pred, gold, finish=["stop", "eos", "stop", "stop"])
    with pytest.raises(NLAError, match="negatives.enabled"):
        _rewards(pred, gold, negatives_cfg=NegativesConfig(enabled=True))
    with pytest.raises(NLAError, match="group_size"):
        _rewards(pred[:3], gold[:3])
    ok = _rewards(pred[:3], gold[:3], group_ids=torch.tensor([0, 0, 1]))
    assert ok.rewards.shape == (3,)
    with pytest.raises(NLAError, match="number of predictions"):
        _rewards([pred[0]] * 3, gold)
    with pytest.raises(NLAError, match="eos_token_ids"):
        response_lengths(_ids([3]), [])
