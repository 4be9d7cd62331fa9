"""Truth and collapse metrics of the RL loop, and the reward-vs-truth alarm on constructed runs."""

import math
import random

import torch

from nla_rl.data.toyworld import SLOTS, full_explanation
from nla_rl.metrics import fve
from nla_rl.truth import RewardTruthAlarm, diversity_metrics, toy_rollout_metrics

FIXED = "It happens in the night. The mood is happy. The number four comes up."


def _truths(n, seed=0):
    rng = random.Random(seed)
    return [frozenset({f"subject={rng.choice(SLOTS['subject'])}",
                       f"mood={rng.choice(SLOTS['mood'])}"}) for _ in range(n)]


def test_toy_rollout_metrics_score_true_and_constant_explanations():
    truths = _truths(16)
    true = toy_rollout_metrics([full_explanation(t) for t in truths], truths)
    assert true["rollout/toy/recall"] == 1.0 and true["rollout/toy/precision"] == 1.0
    const = toy_rollout_metrics([FIXED] * 16, truths)
    assert const["rollout/toy/precision"] < 0.2  # night/four are never true, happy rarely
    failed = toy_rollout_metrics([None] * 16, truths)
    assert failed["rollout/toy/recall"] == 0.0 and failed["rollout/toy/no_mention_rate"] == 1.0
    assert math.isnan(failed["rollout/toy/precision"])


def test_diversity_separates_a_code_from_distinct_explanations():
    truths = _truths(8, seed=1)
    distinct = [full_explanation(t, random.Random(j)) for t in truths for j in range(4)]
    d = diversity_metrics(distinct, group_size=4)
    assert d["rollout/diversity/cross_group"] > 0.7
    collapsed = diversity_metrics([FIXED] * 32, group_size=4)
    assert collapsed["rollout/diversity/cross_group"] == 1 / 8
    assert collapsed["rollout/diversity/distinct"] == 1 / 32
    assert collapsed["rollout/diversity/distinct_2"] < d["rollout/diversity/distinct_2"]
    assert diversity_metrics([None] * 4, group_size=2)["rollout/diversity/distinct"] == 0.0


def _run(alarm, steps):
    fired, warnings = [], []
    for metrics in steps:
        out, warning = alarm.check(metrics)
        fired.append(out["health/reward_up_truth_down"])
        if warning:
            warnings.append(warning)
    return fired, warnings


def test_alarm_fires_when_the_av_collapses_to_one_explanation():
    """Reward keeps rising, but from step 20 on every activation gets the same explanation."""
    truths = _truths(8, seed=2)
    steps = []
    for step in range(40):
        texts = ([FIXED] * 32 if step >= 20 else
                 [full_explanation(t, random.Random(step * 10 + j)) for t in truths for j in range(4)])
        steps.append({"reward/mean": -0.5 + 0.01 * step, **diversity_metrics(texts, 4),
                      **toy_rollout_metrics(texts, [t for t in truths for _ in range(4)])})
    fired, warnings = _run(RewardTruthAlarm(window=10), steps)
    assert sum(fired[:20]) == 0 and fired[-1] == 1.0  # stays on while collapsed
    assert len(warnings) == 1 and "cross_group" in warnings[0] and "precision" in warnings[0]


def _ar_drift_steps(drift: bool):
    """Gold activations; the frozen AR's ĥ is gold + fixed noise; the AV's explanations improve
    (healthy) or move toward what a drifting online AR rewards (frozen-AR FVE falls)."""
    g = torch.Generator().manual_seed(0)
    gold = torch.randn(64, 16, generator=g)
    noise = torch.randn(64, 16, generator=g)
    off = torch.randn(64, 16, generator=g)
    steps = []
    for step in range(30):
        quality = step / 30
        frozen = gold + (1 - quality) * noise + (quality * off if drift else 0)
        steps.append({"reward/mean": -1.0 + quality, "rollout/fve_frozen_ar": fve(frozen, gold, None)})
    return steps


def test_alarm_fires_when_the_online_ar_drifts_from_the_frozen_one():
    fired, warnings = _run(RewardTruthAlarm(window=10), _ar_drift_steps(drift=True))
    assert fired[-1] == 1.0 and len(warnings) == 1 and "fve_frozen_ar" in warnings[0]


def test_alarm_stays_quiet_on_a_healthy_run():
    fired, warnings = _run(RewardTruthAlarm(window=10), _ar_drift_steps(drift=False))
    assert sum(fired) == 0 and warnings == []


def test_alarm_needs_two_windows_and_a_real_rise():
    alarm = RewardTruthAlarm(window=5)
    flat = [{"reward/mean": -0.2, "rollout/fve_frozen_ar": 0.5 - 0.05 * i} for i in range(20)]
    fired, _ = _run(alarm, flat)  # truth falls but the reward does not rise: not this alarm
    assert sum(fired) == 0
    short = RewardTruthAlarm(window=50)
    fired, _ = _run(short, _ar_drift_steps(drift=True))
    assert sum(fired) == 0  # fewer than two windows of history


def test_a_step_fve_divides_by_the_rl_splits_spread():
    """``rollout/fve`` of a step (8 activations here) is measured against the whole RL split's
    spread (RLWorld.fve_spread), not the step's own, which is biased low."""
    from types import SimpleNamespace

    import numpy as np

    from actors.coordinator import RLWorld, Rollouts, truth_metrics
    from nla_rl.config import recipe_from_dict
    from nla_rl.metrics import gold_spread

    gen = torch.Generator().manual_seed(0)
    split = torch.randn(1, 16, generator=gen) + 0.3 * torch.randn(400, 16, generator=gen)
    cfg = recipe_from_dict({}, ["rl.group_size=2", "rl.online_ar=false"])
    world = RLWorld(cfg=cfg, policy=None, critic=None, engines=None,
                    data=SimpleNamespace(vectors=split.numpy()), tracker=None, prompt_ids=[],
                    prefill="", eos_ids=frozenset(), mse_scale=4.0)
    golds = split[:8].repeat_interleave(2, dim=0)
    preds = golds + 0.2 * torch.randn(golds.shape, generator=gen)
    rollouts = Rollouts([], [], [], [FIXED] * 16, [], np.repeat(np.arange(8), 2),
                        golds.numpy(), 16, 0.0)
    metrics = truth_metrics(world, SimpleNamespace(attributes=None), rollouts, preds, None)
    assert world.fve_spread == gold_spread(split, 4.0)
    assert metrics["rollout/fve"] == fve(preds, golds, 4.0, world.fve_spread)
    assert metrics["rollout/fve"] != fve(preds, golds, 4.0)
    assert metrics["rollout/fve_frozen_ar"] == metrics["rollout/fve"]  # frozen AR = live AR
