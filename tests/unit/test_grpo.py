import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nla_rl.config import RLConfig
from nla_rl.errors import ConfigError, NLAError
from nla_rl.grpo import (ADVANTAGES, AGGREGATIONS, PolicyLossSettings, compute_advantages,
                         kept_rollouts, loss_normalizer, policy_loss, rollout_logp_mismatch)

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def reward_groups(draw):
    """[P, G] rewards, P in [1, 6], G in [2, 8], magnitudes from 1e-2 to 1e2."""
    p, g = draw(st.integers(1, 6)), draw(st.integers(2, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** (torch.rand(p, 1, generator=gen) * 4 - 2)
    return torch.randn(p, g, generator=gen) * scale - 1.0


# ------------------------------------------------------------------------------- advantages
@SETTINGS
@given(reward_groups(), st.sampled_from(sorted(ADVANTAGES)))
def test_advantages_sum_to_zero_per_group(rewards, kind):
    adv = compute_advantages(rewards, kind)
    assert adv.advantages.shape == rewards.shape and adv.num_groups == rewards.shape[0]
    torch.testing.assert_close(adv.advantages.sum(dim=1), torch.zeros(rewards.shape[0]),
                               atol=1e-4 * max(1.0, float(adv.advantages.abs().max())), rtol=0)


@SETTINGS
@given(reward_groups(), st.floats(0.1, 100.0), st.floats(-5.0, 5.0))
def test_grpo_is_invariant_to_reward_scale_and_shift(rewards, scale, shift):
    # Invariance holds up to the ε = 1e-6 of the denominator: only where ε ≪ std·scale (here
    # below 0.1% of it); tinier groups are the zero-variance case, tested on its own.
    assume(float(rewards.std(dim=1).min()) * min(scale, 1.0) > 1e-3)
    base = compute_advantages(rewards, "grpo").advantages
    scaled = compute_advantages(rewards * scale + shift, "grpo").advantages
    torch.testing.assert_close(scaled, base, atol=2e-3, rtol=2e-3)
    # Dr.GRPO is not scale invariant: it scales with the rewards.
    dr = compute_advantages(rewards, "drgrpo").advantages
    torch.testing.assert_close(compute_advantages(rewards * scale, "drgrpo").advantages,
                               dr * scale, atol=1e-4 * scale, rtol=1e-4)


def test_grpo_uses_the_sample_std():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, 5.0]])
    adv = compute_advantages(rewards, "grpo").advantages
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_zero_variance_groups_are_counted_and_get_zero_advantage():
    rewards = torch.tensor([[-2.0, -2.0, -2.0], [0.1, 0.5, 0.6], [-0.7, -0.7, -0.7]])
    for kind in ADVANTAGES:
        out = compute_advantages(rewards, kind)
        assert out.zero_variance_groups == 2
        assert bool((out.advantages[[0, 2]] == 0).all())
        assert bool((out.advantages[1] != 0).all())


def test_flat_rewards_with_group_ids_match_the_grid():
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(5, 4, generator=gen)
    perm = torch.randperm(20, generator=gen)
    ids = torch.arange(5).repeat_interleave(4) * 7 + 3  # any labels, not 0..P-1
    flat = compute_advantages(grid.reshape(-1)[perm], "grpo", group_ids=ids[perm])
    torch.testing.assert_close(flat.advantages, compute_advantages(grid).advantages.reshape(-1)[perm])
    # A singleton group has no variance to compare against.
    single = compute_advantages(torch.tensor([1.0, 2.0, 3.0]), group_ids=torch.tensor([0, 0, 1]))
    assert single.zero_variance_groups == 1 and float(single.advantages[2]) == 0.0


def test_advantage_input_errors():
    with pytest.raises(NLAError, match="NaN or Inf"):
        compute_advantages(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(NLAError, match="group_ids"):
        compute_advantages(torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="advantage kind"):
        compute_advantages(torch.zeros(2, 2), "ppo")


def _written_out_grpo(rewards: list[list[float]], eps: float) -> tuple[list[list[float]], float]:
    """Per group: mean = Σr/n, std = sqrt(Σ(r - mean)² / (n - 1)), A = (r - mean)/(std + ε);
    and the mean over groups of std. Plain Python, nothing shared with the code under test."""
    advantages, stds = [], []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        stds.append(std)
        advantages.append([(r - mean) / (std + eps) for r in group])
    return advantages, sum(stds) / len(stds)


@pytest.mark.parametrize("eps", [1e-6, 1e-4])  # nla-rl's default, TRL's
def test_grpo_advantage_eps_conventions_match_the_formula(eps):
    # -MSE rewards of tight groups: within-group spread near 1e-3, where ε matters.
    rewards = [[-0.5012, -0.4997, -0.5003, -0.4989], [-1.2, -1.1995, -1.2021, -1.1987]]
    out = compute_advantages(torch.tensor(rewards, dtype=torch.float64), "grpo", eps=eps)
    expected, std_mean = _written_out_grpo(rewards, eps)
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.group_std_mean == pytest.approx(std_mean, rel=1e-9)
    assert 5e-4 < std_mean < 2e-3


def test_advantage_eps_default_is_unchanged_and_changes_tight_groups_by_the_expected_factor():
    rewards = torch.tensor([[-0.5012, -0.4997, -0.5003, -0.4989]], dtype=torch.float64)
    assert RLConfig().advantage_eps == 1e-6  # existing recipes keep their advantages
    default = compute_advantages(rewards, "grpo").advantages
    torch.testing.assert_close(default, compute_advantages(rewards, "grpo", eps=1e-6).advantages)
    trl = compute_advantages(rewards, "grpo", eps=1e-4).advantages
    std = float(rewards.std())
    # A_ε = (r - mean)/(std + ε), so A_1e-4 / A_1e-6 = (std + 1e-6)/(std + 1e-4), 0.91 here.
    torch.testing.assert_close(trl / default, torch.full_like(trl, (std + 1e-6) / (std + 1e-4)),
                               rtol=1e-5, atol=0)
    assert (std + 1e-6) / (std + 1e-4) < 0.93
    # Dr.GRPO has no std division: ε changes nothing.
    torch.testing.assert_close(compute_advantages(rewards, "drgrpo", eps=1e-4).advantages,
                               compute_advantages(rewards, "drgrpo", eps=1e-6).advantages)
    for bad in (0.0, -1e-6, float("nan")):
        with pytest.raises(ConfigError, match="advantage eps"):
            compute_advantages(rewards, "grpo", eps=bad)
    with pytest.raises(ConfigError, match="advantage_eps"):
        RLConfig(advantage_eps=0.0)


def test_group_std_mean_skips_nothing_and_counts_zero_variance_groups_as_zero():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
    assert compute_advantages(rewards).group_std_mean == pytest.approx((0.0 + 1.0) / 2)


# --------------------------------------------------------------------------- PPO clipping
NO_KL = PolicyLossSettings(clip_low=0.2, clip_high=0.28, kl_beta=0.0, mismatch_threshold=None)


def _grad_at(ratio: float, advantage: float, settings=NO_KL):
    """d loss / d logp for one token whose ratio exp(logp - old) is ``ratio``."""
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    out = policy_loss(logp, torch.tensor([advantage]), torch.ones(1, 1, dtype=torch.bool),
                      settings, old_logp=old)
    out.loss.backward()
    return float(logp.grad), out.stats


@pytest.mark.parametrize("advantage", [1.5, -0.7])
def test_ppo_clip_gradients(advantage):
    eps_low, eps_high = NO_KL.clip_low, NO_KL.clip_high
    inside = [1 - eps_low / 2, 1.0, 1 + eps_high / 2]
    for ratio in inside:  # the surrogate -A·ρ has gradient -A·ρ w.r.t. logp
        grad, stats = _grad_at(ratio, advantage)
        assert grad == pytest.approx(-advantage * ratio, rel=1e-5)
        assert stats["policy/clip_frac_high"] == stats["policy/clip_frac_low"] == 0
    above, below = 1 + eps_high + 0.3, 1 - eps_low - 0.3
    # The clip only stops the update that would move ρ further in the direction A favours.
    vanishing, alive = (above, below) if advantage > 0 else (below, above)
    grad, stats = _grad_at(vanishing, advantage)
    assert grad == 0.0
    assert stats["policy/clip_frac_high" if advantage > 0 else "policy/clip_frac_low"] == 1.0
    grad, stats = _grad_at(alive, advantage)
    assert grad == pytest.approx(-advantage * alive, rel=1e-5)
    assert stats["policy/clip_frac_high"] == stats["policy/clip_frac_low"] == 0


def test_asymmetric_clip_bounds():
    wide = PolicyLossSettings(clip_low=0.2, clip_high=0.5, mismatch_threshold=None)
    assert _grad_at(1.4, 1.0, wide)[0] != 0.0  # inside 1 + 0.5
    assert _grad_at(1.4, 1.0, NO_KL)[0] == 0.0  # outside 1 + 0.28
    assert _grad_at(0.85, -1.0, wide)[0] != 0.0 and _grad_at(0.75, -1.0, wide)[0] == 0.0


# -------------------------------------------------------------------------------------- KL
def _kl_only(logp_value: float, ref_value: float, estimator: str):
    s = PolicyLossSettings(kl_beta=1.0, kl_estimator=estimator, mismatch_threshold=None)
    logp = torch.tensor([[logp_value]], dtype=torch.float32, requires_grad=True)
    out = policy_loss(logp, torch.zeros(1), torch.ones(1, 1), s,
                      ref_logp=torch.tensor([[ref_value]]))
    out.loss.backward()
    return float(out.loss.detach()), float(logp.grad)


@SETTINGS
@given(st.floats(-8.0, -0.01), st.floats(-8.0, -0.01))
def test_k1_and_k3_values_and_gradient_signs(logp, ref):
    delta = ref - logp
    k1, g1 = _kl_only(logp, ref, "k1")
    assert k1 == pytest.approx(-delta, abs=1e-5) and g1 == pytest.approx(1.0)
    k3, g3 = _kl_only(logp, ref, "k3")
    assert k3 == pytest.approx(math.exp(delta) - delta - 1, rel=1e-4, abs=1e-5) and k3 >= 0
    # k3's gradient pulls logp back towards the reference from either side.
    assert g3 == pytest.approx(1 - math.exp(delta), rel=1e-4, abs=1e-5)
    if abs(delta) > 1e-3:
        assert math.copysign(1, g3) == math.copysign(1, logp - ref)


def test_kl_off_when_beta_is_zero():
    gen = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 5, generator=gen) - 0.1
    adv, mask = torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 5)
    off = PolicyLossSettings(kl_beta=0.0, mismatch_threshold=None)
    no_ref = policy_loss(logp, adv, mask, off)
    far_ref = policy_loss(logp, adv, mask, off, ref_logp=logp - 3.0)
    assert float(no_ref.loss_sum) == float(far_ref.loss_sum)
    assert far_ref.stats["policy/ref_kl"] > 0 and "policy/ref_kl" not in no_ref.stats
    on = PolicyLossSettings(kl_beta=0.1, mismatch_threshold=None)
    assert float(policy_loss(logp, adv, mask, on, ref_logp=logp - 3.0).loss_sum) > float(
        no_ref.loss_sum)
    with pytest.raises(NLAError, match="ref_logp is required"):
        policy_loss(logp, adv, mask, on)


# ----------------------------------------------------------------------- importance sampling
def test_is_weights_are_truncated_at_the_cap_and_detached():
    cap = 2.0
    s = PolicyLossSettings(is_cap=cap, mismatch_threshold=None)
    old = torch.full((3, 1), -1.0)
    engine = old - torch.tensor([[math.log(1.5)], [math.log(5.0)], [-math.log(2.0)]])
    logp = old.clone().requires_grad_(True)
    out = policy_loss(logp, torch.ones(3), torch.ones(3, 1), s, old_logp=old, engine_logp=engine)
    out.loss_sum.backward()
    expected_w = torch.tensor([[1.5], [cap], [0.5]])
    torch.testing.assert_close(logp.grad, -expected_w)  # w·(-A·ρ) with ρ = 1, A = 1
    assert out.stats["policy/is_weight_mean"] == pytest.approx(float(expected_w.mean()), rel=1e-5)
    assert out.stats["policy/is_capped_frac"] == pytest.approx(1 / 3)


def test_rollouts_with_a_large_logp_mismatch_are_masked_and_counted():
    s = PolicyLossSettings(mismatch_threshold=0.1)
    old = torch.full((4, 3), -1.0)
    engine = old.clone()
    engine[1] -= 0.5  # lost injection: the engine sampled from another distribution
    engine[2, 0] = float("nan")  # garbage from the engine always masks
    engine[3] -= 0.05  # ordinary numeric noise stays
    mask = torch.ones(4, 3, dtype=torch.bool)
    dist = rollout_logp_mismatch(old, engine, mask)
    assert dist[0] == 0 and dist[1] == pytest.approx(0.5) and math.isinf(dist[2])
    keep = kept_rollouts(mask, old, engine, 0.1)
    assert keep.tolist() == [True, False, False, True]
    logp = old.clone().requires_grad_(True)
    out = policy_loss(logp, torch.ones(4), mask, s, old_logp=old, engine_logp=engine)
    out.loss_sum.backward()
    assert out.stats["policy/masked_rollouts"] == 2 and out.token_count == 6
    assert out.normalizer == 6 == loss_normalizer(mask, s, old, engine)
    assert bool((logp.grad[1:3] == 0).all()) and bool((logp.grad[[0, 3]] != 0).all())
    assert math.isfinite(float(out.loss_sum.detach()))


def test_padding_garbage_never_reaches_the_gradient():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), float("nan")]],
                        requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    junk = torch.full((2, 3), float("nan"))
    junk[mask] = -1.0
    s = PolicyLossSettings(kl_beta=0.05, mismatch_threshold=1.0)
    out = policy_loss(logp, torch.tensor([1.0, -1.0]), mask, s, old_logp=junk,
                      engine_logp=junk, ref_logp=junk)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and bool(torch.isfinite(logp.grad).all())
    assert bool((logp.grad[~mask] == 0).all()) and out.token_count == 3


# ------------------------------------------------------------------- aggregation exactness
def _step_inputs(seed: int, rows: int = 7, width: int = 9):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(rows, width, generator=gen, requires_grad=True)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    noise = lambda s: s * torch.randn(rows, width, generator=gen)  # noqa: E731
    logp0 = -torch.nn.functional.softplus(theta.detach())
    old, engine, ref = logp0 + noise(0.2), logp0 + noise(0.02), logp0 + noise(0.3)
    engine[2] -= 3.0  # one rollout over the mismatch threshold, far beyond the noise
    adv = torch.randn(rows, generator=gen)
    return theta, mask, old, engine, ref, adv


def _grad(theta, parts, mask, old, engine, ref, adv, s, *, naive=False):
    theta.grad = None
    total = sum(loss_normalizer(mask[p], s, old[p], engine[p]) for p in parts)
    loss = 0.0
    for p in parts:
        out = policy_loss(-torch.nn.functional.softplus(theta[p]), adv[p], mask[p], s,
                          old_logp=old[p], engine_logp=engine[p], ref_logp=ref[p])
        assert out.normalizer == loss_normalizer(mask[p], s, old[p], engine[p])
        loss = loss + (out.loss / len(parts) if naive else out.loss_sum / total)
    loss.backward()
    return theta.grad.clone()


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(sorted(AGGREGATIONS)))
def test_micro_batches_give_the_gradient_of_the_whole_step(seed, agg):
    theta, mask, old, engine, ref, adv = _step_inputs(seed)
    s = PolicyLossSettings(kl_beta=0.05, mismatch_threshold=0.5, loss_agg=agg,
                           max_completion_tokens=9)
    whole = _grad(theta, [slice(0, 7)], mask, old, engine, ref, adv, s)
    split = [slice(0, 2), slice(2, 3), slice(3, 7)]
    torch.testing.assert_close(_grad(theta, split, mask, old, engine, ref, adv, s), whole,
                               atol=1e-6, rtol=1e-5)
    assert bool((whole[2] == 0).all())  # the masked rollout


def test_averaging_micro_batch_means_would_be_wrong():
    """The exactness above is not vacuous: mean of per-micro-batch means weights tokens unequally."""
    theta, mask, old, engine, ref, adv = _step_inputs(3)
    s = PolicyLossSettings(kl_beta=0.05, mismatch_threshold=0.5)
    split = [slice(0, 2), slice(2, 3), slice(3, 7)]
    exact = _grad(theta, split, mask, old, engine, ref, adv, s)
    naive = _grad(theta, split, mask, old, engine, ref, adv, s, naive=True)
    assert not torch.allclose(exact, naive, atol=1e-5)


def test_seq_mean_token_mean_weights_each_rollout_equally():
    logp = torch.full((2, 4), -1.0)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -3.0])  # ρ = 1, so L_t = -A
    tok = policy_loss(logp, adv, mask, PolicyLossSettings(loss_agg="token_mean"))
    seq = policy_loss(logp, adv, mask, PolicyLossSettings(loss_agg="seq_mean_token_mean"))
    assert float(tok.loss) == pytest.approx((-1.0 + 4 * 3.0) / 5) and tok.normalizer == 5
    assert float(seq.loss) == pytest.approx((-1.0 + 3.0) / 2) and seq.normalizer == 2


DR = "seq_mean_token_sum_norm"


def test_dr_grpo_aggregation_is_the_token_sum_over_rollouts_times_max_len():
    """Dr.GRPO / TRL ``loss_type="dr_grpo"``:
    ``loss = Σ_{b,t} m_bt · L_bt / (B · L_max)`` with B every row of the batch and L_max the
    completion cap; with ρ = 1 and no KL, ``L_bt = -A_b``."""
    logp = torch.full((3, 4), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # 1 empty
    adv = [1.0, -3.0, 2.0]
    lengths = [1, 4, 0]
    l_max = 6
    s = PolicyLossSettings(loss_agg=DR, max_completion_tokens=l_max)
    out = policy_loss(logp, torch.tensor(adv), mask, s)
    expected = sum(-a * n for a, n in zip(adv, lengths)) / (3 * l_max)
    assert out.normalizer == 3 * l_max and float(out.loss.detach()) == pytest.approx(expected)
    out.loss.backward()  # every kept token gets d/dlogp = -A_b / (B · L_max), whatever its length
    grad = torch.tensor([[-adv[b] / (3 * l_max) if mask[b, t] else 0.0 for t in range(4)]
                         for b in range(3)])
    torch.testing.assert_close(logp.grad, grad)
    # token_mean differs from it by exactly B·L_max / N_tokens (N = 5 kept tokens).
    tok = policy_loss(logp.detach(), torch.tensor(adv), mask, PolicyLossSettings())
    assert float(out.loss.detach()) == pytest.approx(float(tok.loss) * 5 / (3 * l_max))
    assert loss_normalizer(mask, s) == 3 * l_max


def test_dr_grpo_keeps_masked_rollouts_in_its_constant_normaliser():
    logp = torch.full((2, 3), -1.0)
    mask = torch.ones(2, 3, dtype=torch.bool)
    engine = logp.clone()
    engine[1] -= 5.0  # rollout 1 is over the mismatch threshold: no loss, still counted in B
    s = PolicyLossSettings(loss_agg=DR, max_completion_tokens=4, mismatch_threshold=0.1)
    out = policy_loss(logp, torch.tensor([1.0, 7.0]), mask, s, old_logp=logp, engine_logp=engine)
    assert out.normalizer == 2 * 4 and out.stats["policy/masked_rollouts"] == 1
    assert float(out.loss) == pytest.approx(-1.0 * 3 / 8)


def test_dr_grpo_needs_the_completion_cap():
    with pytest.raises(ConfigError, match="max_completion_tokens"):
        PolicyLossSettings(loss_agg=DR)
    s = PolicyLossSettings.from_rl(RLConfig(loss_agg=DR, max_new_tokens=32))
    assert (s.loss_agg, s.max_completion_tokens) == (DR, 32)


def test_settings_from_the_recipe_and_bad_settings():
    rl = RLConfig(clip_low=0.1, clip_high=0.3, kl_beta=0.02, kl_estimator="k1", is_cap=3.0,
                  is_mismatch_threshold=None, loss_agg="seq_mean_token_mean")
    s = PolicyLossSettings.from_rl(rl)
    assert (s.clip_low, s.clip_high, s.kl_beta, s.kl_estimator, s.is_cap, s.mismatch_threshold,
            s.loss_agg) == (0.1, 0.3, 0.02, "k1", 3.0, None, "seq_mean_token_mean")
    with pytest.raises(ConfigError, match="kl_estimator"):
        PolicyLossSettings(kl_estimator="k2")
    with pytest.raises(ConfigError, match="clip_low"):
        PolicyLossSettings(clip_low=1.5)
    with pytest.raises(NLAError, match="advantages shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), s)
    with pytest.raises(NLAError, match="mask shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 4), s)
