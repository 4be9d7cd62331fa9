import pytest
import torch

from nla_rl.errors import NLAError
from nla_rl.health import (CJK_RANGES, HealthError, check_step0_health, cjk_rate, has_cjk,
                           rollout_health)


def test_every_named_cjk_range_is_detected_at_both_ends():
    for name, first, last in CJK_RANGES:
        assert has_cjk(f"a {chr(first)} b") and has_cjk(chr(last)), name
    for outside in (0x2E7F, 0xA000, 0xABFF, 0xD7B0, 0xF8FF, 0xFB00, 0xFEFF, 0xFFF0):
        assert not has_cjk(f"x{chr(outside)}y"), hex(outside)
    assert not has_cjk("<explanation> plain ASCII, Ünïcödé, кириллица </explanation>")


def test_cjk_rate_counts_rollouts_not_characters():
    texts = ["fine", "漢字漢字漢字", "mixed ㈠ marker echo", "ｆｕｌｌ width", "also fine"]
    assert cjk_rate(texts) == pytest.approx(3 / 5)
    assert cjk_rate([]) == 0.0


def test_rollout_health_metrics():
    learner = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, float("nan")]])
    engine = torch.tensor([[-1.1, -2.1, -3.1], [-1.6, -1.4, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    m = rollout_health(["<explanation>a</explanation>", "漢"], ["a", None],
                       injection_applied=2, injection_expected=2, learner_logp=learner,
                       engine_logp=engine, mask=mask, skipped_steps=1)
    assert all(k.startswith("health/") for k in m)
    assert m["health/cjk_rate"] == 0.5 and m["health/extraction_failure_rate"] == 0.5
    assert m["health/logp_mismatch_mean"] == pytest.approx((0.1 * 3 + 0.6 + 0.4) / 5, rel=1e-5)
    assert m["health/logp_mismatch_max"] == pytest.approx(0.5, rel=1e-5)
    assert m["health/skipped_steps"] == 1 and m["health/injection_applied"] == 2
    plain = rollout_health(["a"], ["a"], injection_applied=1, injection_expected=1)
    assert "health/logp_mismatch_mean" not in plain
    with pytest.raises(NLAError, match="one per rollout"):
        rollout_health(["a", "b"], ["a"], injection_applied=1, injection_expected=1)


def _metrics(applied, expected, failures, total=8):
    explanations = ["x"] * (total - failures) + [None] * failures
    return rollout_health(["t"] * total, explanations, injection_applied=applied,
                          injection_expected=expected)


def test_step0_health_raises_on_broken_injection():
    with pytest.raises(HealthError, match="injected into 6 of 8 prompts.*marker token id"):
        check_step0_health(_metrics(6, 8, 0))


def test_step0_health_raises_on_mostly_unparseable_rollouts():
    with pytest.raises(HealthError, match="62% of rollouts.*av_prefill"):
        check_step0_health(_metrics(8, 8, 5))


def test_step0_health_passes_a_healthy_step():
    check_step0_health(_metrics(8, 8, 0))
    check_step0_health(_metrics(8, 8, 4))  # exactly half: at the limit, not over it
    with pytest.raises(HealthError, match="missing"):
        check_step0_health({"health/injection_applied": 1.0})
    assert issubclass(HealthError, NLAError)
