import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nla_rl.errors import ConfigError, NLAError
from nla_rl.metrics import (cosine, fve, fve_from_error, fve_meannorm, gold_spread, hard_negative_gap,
                            top1_retrieval)
from nla_rl.rewards import (CONTRASTIVE, REWARDS, apply_failures, combined_reward,
                            contrastive_infonce, contrastive_max, failure_penalty, mse_scale_for,
                            normalized_mse, reward_neg_log_mse, reward_neg_mse)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def vector_pairs(draw, min_rows=1, max_rows=8):
    """(pred, gold) [n, d] with d in [2, 64] and per-row norms spread over five orders of magnitude.

    Norms stay ≥ ~1e-2 ≫ sqrt(ε) = 1e-6: below that the ε inside normalize_to's square root
    (there for finite gradients at 0) visibly shortens the normalised vector.
    """
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(2, 64))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    norms = 10.0 ** (torch.rand(2, n, 1, generator=gen) * 5 - 2)
    unit = torch.nn.functional.normalize
    pred = unit(torch.randn(n, d, generator=gen), dim=-1) * norms[0]
    gold = unit(torch.randn(n, d, generator=gen), dim=-1) * norms[1]
    return pred, gold


def _negatives(gold, m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(gold.shape[0], m, gold.shape[1], generator=gen)


# --------------------------------------------------------------------------------------- MSE
@SETTINGS
@given(vector_pairs())
def test_mse_is_two_one_minus_cos_at_sqrt_d(pair):
    pred, gold = pair
    mse = normalized_mse(pred, gold, mse_scale_for(pred.shape[1]))
    cos = torch.nn.functional.cosine_similarity(pred.double(), gold.double(), dim=-1).float()
    torch.testing.assert_close(mse, 2 * (1 - cos), atol=1e-4, rtol=0)
    assert mse.dtype == torch.float32 and mse.shape == (pred.shape[0],)


@SETTINGS
@given(vector_pairs(), st.floats(0.1, 1000.0))
def test_mse_bounds(pair, scale):
    pred, gold = pair
    d = pred.shape[1]
    for candidate in (pred, gold, -gold):
        mse = normalized_mse(candidate, gold, math.sqrt(d))
        assert bool(((mse >= 0) & (mse <= 4 + 1e-5)).all())
    torch.testing.assert_close(normalized_mse(gold, gold, scale), torch.zeros(gold.shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized_mse(-gold, gold, math.sqrt(d)), torch.full((gold.shape[0],), 4.0))


@SETTINGS
@given(vector_pairs(), st.floats(0.1, 100.0), st.floats(0.1, 100.0))
def test_mse_invariant_to_positive_rescaling(pair, a, b):
    pred, gold = pair
    s = mse_scale_for(pred.shape[1])
    torch.testing.assert_close(normalized_mse(a * pred, b * gold, s), normalized_mse(pred, gold, s),
                               atol=1e-5, rtol=1e-4)


def test_raw_mse_when_scale_is_none():
    pred, gold = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    assert normalized_mse(pred, gold, None).tolist() == [4.0]


def test_zero_prediction_is_finite_and_gives_mse_one():
    gold = torch.randn(3, 16)
    pred = torch.zeros(3, 16, requires_grad=True)
    mse = normalized_mse(pred, gold, mse_scale_for(16))
    torch.testing.assert_close(mse, torch.ones(3))
    mse.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(NLAError, match="shape"):
        normalized_mse(torch.zeros(2, 8), torch.zeros(2, 9), 1.0)
    with pytest.raises(NLAError, match="shape"):
        cosine(torch.zeros(3, 8), torch.zeros(2, 8))
    with pytest.raises(NLAError, match="negatives"):
        hard_negative_gap(torch.ones(2, 8), torch.ones(2, 8), torch.ones(2, 3, 7))
    with pytest.raises(NLAError, match="m = 0"):
        contrastive_max(torch.ones(2, 8), torch.ones(2, 8), torch.ones(2, 0, 8), 1.0)


# --------------------------------------------------------------------------------------- rewards
@SETTINGS
@given(st.lists(st.floats(0.0, 4.0), min_size=2, max_size=10))
def test_rewards_decrease_with_mse(values):
    mse = torch.tensor(sorted(values))
    for kind, fn in REWARDS.items():
        r = fn(mse)
        assert bool((r[1:] <= r[:-1]).all()), kind
        assert torch.isfinite(r).all()


def test_reward_values_and_penalties():
    mse = torch.tensor([0.0, 2.0, 1e-12])
    assert reward_neg_mse(mse).tolist() == pytest.approx([0.0, -2.0, -1e-12])
    torch.testing.assert_close(reward_neg_log_mse(mse), torch.tensor([-math.log(1e-8), -math.log(2), -math.log(1e-8)]))
    # The penalty is what an orthogonal prediction (MSE = 2) would get.
    assert failure_penalty("neg_mse") == -2.0 == float(reward_neg_mse(torch.tensor(2.0)))
    assert failure_penalty("neg_log_mse") == pytest.approx(float(reward_neg_log_mse(torch.tensor(2.0))))
    with pytest.raises(ConfigError, match="reward kind"):
        failure_penalty("neg_cos")


@pytest.mark.parametrize("kind", sorted(REWARDS))
def test_apply_failures_sets_penalty_and_floors_non_finite(kind):
    rewards = torch.tensor([-0.5, float("nan"), float("inf"), -float("inf"), -0.1])
    failed = torch.tensor([False, False, False, False, True])
    out = apply_failures(rewards, failed, kind)
    p = failure_penalty(kind)
    assert out.tolist() == pytest.approx([-0.5, p, p, p, p])
    assert torch.isnan(rewards[1])  # input untouched
    assert apply_failures(rewards, None, kind)[4] == pytest.approx(-0.1)
    with pytest.raises(NLAError, match="failed_mask"):
        apply_failures(rewards, torch.tensor([True]), kind)


@SETTINGS
@given(vector_pairs(min_rows=2), st.integers(1, 4))
def test_contrastive_max_is_scaled_cos_gap(pair, m):
    pred, gold = pair
    negatives = _negatives(gold, m)
    r = contrastive_max(pred, gold, negatives, mse_scale_for(pred.shape[1]))
    unit = torch.nn.functional.normalize
    cos_pos = (unit(pred.double(), dim=-1) * unit(gold.double(), dim=-1)).sum(-1)
    cos_neg = (unit(pred.double(), dim=-1).unsqueeze(1) * unit(negatives.double(), dim=-1)).sum(-1)
    torch.testing.assert_close(r.double(), 2 * (cos_pos - cos_neg.max(1).values), atol=1e-4, rtol=0)


def test_contrastive_max_sign():
    gold = torch.eye(4)[:2] + 0.1
    negatives = torch.stack([torch.eye(4)[2:], torch.eye(4)[[3, 2]]])  # orthogonal-ish negatives
    s = mse_scale_for(4)
    assert bool((contrastive_max(gold, gold, negatives, s) > 0).all())
    assert bool((contrastive_max(negatives[:, 0], gold, negatives, s) < 0).all())
    assert contrastive_max(gold, gold, gold.unsqueeze(1).repeat(1, 3, 1), s).tolist() == [0.0, 0.0]


def test_infonce_is_non_positive_and_rises_as_negatives_move_away():
    gen = torch.Generator().manual_seed(0)
    gold = torch.randn(5, 16, generator=gen)
    pred = gold + 0.3 * torch.randn(5, 16, generator=gen)
    direction = torch.randn(5, 3, 16, generator=gen)
    s = mse_scale_for(16)
    previous = None
    for t in torch.linspace(0.0, 1.0, 6):  # negatives slide from the gold towards unrelated vectors
        negatives = (1 - t) * gold.unsqueeze(1) + t * 3 * direction
        r = contrastive_infonce(pred, gold, negatives, s, tau=0.5)
        assert bool((r <= 0).all())
        if previous is not None:
            assert bool((r >= previous - 1e-6).all())
        previous = r
    assert float(previous.mean()) > float(contrastive_infonce(pred, gold, gold.unsqueeze(1).repeat(1, 3, 1), s).mean())
    # Negatives equal to the gold: the positive is one of 1 + m equal candidates.
    torch.testing.assert_close(contrastive_infonce(pred, gold, gold.unsqueeze(1).repeat(1, 3, 1), s),
                               torch.full((5,), -math.log(4)))
    with pytest.raises(ConfigError, match="tau"):
        contrastive_infonce(pred, gold, negatives, s, tau=0.0)


def test_contrastive_registry_and_combiner():
    assert set(CONTRASTIVE) == {"max", "infonce"}
    gold = torch.randn(3, 8)
    negatives = _negatives(gold, 2)
    for fn in CONTRASTIVE.values():
        assert fn(gold, gold, negatives, mse_scale_for(8)).shape == (3,)
    base, contrastive = torch.tensor([-1.0, -0.5]), torch.tensor([0.2, -0.4])
    assert combined_reward(base, contrastive, 0.5).tolist() == pytest.approx([-0.9, -0.7])
    assert torch.equal(combined_reward(base, contrastive, 0.0), base)


# --------------------------------------------------------------------------------------- metrics
@SETTINGS
@given(vector_pairs())
def test_cosine_matches_torch(pair):
    pred, gold = pair
    expected = torch.nn.functional.cosine_similarity(pred.double(), gold.double(), dim=-1).float()
    torch.testing.assert_close(cosine(pred, gold), expected, atol=1e-5, rtol=0)


def _clustered_golds(n=256, d=32, spread=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(1, d, generator=gen)
    return (common + spread * torch.randn(n, d, generator=gen)) * (10.0 ** torch.rand(n, 1, generator=gen))


def test_fve_perfect_and_random():
    gold = _clustered_golds()
    s = mse_scale_for(32)
    assert fve(gold, gold, s) == pytest.approx(1.0)
    assert fve(3.0 * gold, gold, s) == pytest.approx(1.0)  # directions only
    noise = torch.randn(gold.shape, generator=torch.Generator().manual_seed(1))
    assert fve(noise, gold, s) < 0
    assert fve(gold + noise, gold, 1.0) == pytest.approx(fve(gold + noise, gold, s), rel=1e-5)
    for fn in (fve, fve_meannorm):
        assert math.isnan(fn(gold[:1], gold[:1], s))  # one row: no variance


@pytest.mark.parametrize("fn", [fve, fve_meannorm])
@pytest.mark.parametrize("scale", [mse_scale_for(32), 1.0, None])
def test_no_variance_is_nan_whatever_the_rounding(fn, scale):
    """One row, copies of one row, or (normalised) golds that share a direction have no variance
    to explain: NaN on every seed, not 1.0 where renormalising left a rounding-sized denominator."""
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        row = torch.randn(1, 32, generator=gen) * 10.0 ** float(torch.rand(1, generator=gen) * 4 - 2)
        pred = torch.randn(4, 32, generator=gen)
        assert math.isnan(fn(row, row, scale)), seed
        assert math.isnan(fn(pred[:1], row, scale)), seed
        assert math.isnan(fn(pred, row.expand(4, 32), scale)), seed
        if scale is not None:  # norms differ, directions agree: nothing left after normalising
            assert math.isnan(fn(pred, row * torch.tensor([[0.5], [1.0], [3.0], [70.0]]), scale)), seed


def test_a_small_real_variance_is_not_mistaken_for_none():
    gold = torch.ones(2, 32)
    gold[1, 0] += 1e-3  # a variance of 7.6e-9 × the squared norm: small, but 75× the tolerance
    assert math.isfinite(fve(gold, gold, mse_scale_for(32)))
    assert fve(gold, gold, mse_scale_for(32)) == pytest.approx(1.0)


def test_fve_from_error_matches_fve():
    gold = _clustered_golds(n=64)
    pred = gold + torch.randn(gold.shape, generator=torch.Generator().manual_seed(3))
    s = mse_scale_for(32)
    error = float(normalized_mse(pred, gold, s).mean()) * 32  # E‖n(ĥ)-n(h)‖² = d · MSE
    assert fve_from_error(error, gold, s) == pytest.approx(fve(pred, gold, s), rel=1e-5)
    assert math.isnan(fve_from_error(0.0, gold[:1], s))


def test_fve_against_a_population_spread():
    """On the whole population the spread changes nothing. On small batches (an RL step scores
    8 activations) a batch's own spread is biased low, and so is its FVE (the tiny run's AR-SFT:
    0.04 on average over batches of 8 eval rows, 0.21 on all of them); the population's spread
    gives batch FVEs whose mean is the population's."""
    gold = _clustered_golds(n=512)
    noise = torch.randn(gold.shape, generator=torch.Generator().manual_seed(4))
    pred = torch.nn.functional.normalize(gold, dim=1) + 0.08 * noise  # FVE ≈ 0.1, as on the toy
    s = mse_scale_for(32)
    spread = gold_spread(gold, s)
    whole = fve(pred, gold, s)
    assert fve(pred, gold, s, spread) == pytest.approx(whole, rel=1e-5)
    own = [fve(pred[b:b + 8], gold[b:b + 8], s) for b in range(0, 512, 8)]
    shared = [fve(pred[b:b + 8], gold[b:b + 8], s, spread) for b in range(0, 512, 8)]
    assert sum(shared) / len(shared) == pytest.approx(whole, abs=1e-4)  # error is a row mean
    assert whole - sum(own) / len(own) > 0.1
    assert math.isnan(gold_spread(gold[:1], s))
    assert math.isnan(fve(pred[:4], gold[:4], s, gold_spread(gold[:1].expand(4, 32), s)))
    with pytest.raises(ValueError, match="2-D"):
        gold_spread(gold[0], s)


def test_predicting_the_mean_direction():
    gold = _clustered_golds()
    s = mse_scale_for(32)
    mu = torch.nn.functional.normalize(gold, dim=-1).mean(0, keepdim=True).expand_as(gold)
    # The meannorm variant reads 0 for the mean direction; the paper's FVE reads below 0.
    assert fve_meannorm(mu, gold, s) == pytest.approx(0.0, abs=1e-5)
    assert fve(mu, gold, s) < -0.01


@SETTINGS
@given(vector_pairs(min_rows=2, max_rows=16))
def test_meannorm_never_below_paper_fve(pair):
    pred, gold = pair
    s = mse_scale_for(pred.shape[1])
    assert fve_meannorm(pred, gold, s) >= fve(pred, gold, s) - 1e-5


def test_meannorm_differs_on_constructed_example():
    s = mse_scale_for(2)
    gold = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pred = torch.tensor([[1.0, 0.6], [0.6, 1.0]])
    # μ = s·(0.5, 0.5)/1: ‖μ‖ = s/√2 < s, so the meannorm denominator is larger.
    paper, older = fve(pred, gold, s), fve_meannorm(pred, gold, s)
    assert older > paper + 0.05
    err = float(normalized_mse(pred, gold, s).mean()) * 2  # E‖n(ĥ)-n(h)‖² = d · MSE
    assert paper == pytest.approx(1 - err / 1.0, rel=1e-5)  # E‖n(h) - μ‖² = s²/2 = 1
    assert older == pytest.approx(1 - err / (2 * (2 - math.sqrt(2))), rel=1e-5)


def test_gap_and_top1():
    gen = torch.Generator().manual_seed(0)
    gold = torch.randn(6, 16, generator=gen)
    negatives = torch.randn(6, 3, 16, generator=gen)
    same = gold.unsqueeze(1).repeat(1, 3, 1)
    assert hard_negative_gap(gold, gold, same) == 0.0
    assert top1_retrieval(gold, gold, same) == 0.0  # ties are failures
    assert top1_retrieval(gold, gold, negatives) == 1.0
    assert hard_negative_gap(gold, gold, negatives) > 0
    assert top1_retrieval(negatives[:, 0], gold, negatives) == 0.0
    assert hard_negative_gap(negatives[:, 0], gold, negatives) < 0
    mixed = torch.cat([gold[:3], negatives[3:, 1]])
    assert top1_retrieval(mixed, gold, negatives) == pytest.approx(0.5)
    expected = (cosine(mixed, gold) - torch.stack([cosine(mixed, negatives[:, j]) for j in range(3)], 1).max(1).values)
    assert hard_negative_gap(mixed, gold, negatives) == pytest.approx(float(expected.mean()), abs=1e-6)
