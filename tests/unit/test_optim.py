"""Optimiser groups, learning-rate schedule, and the guarded step that skips non-finite gradients."""

import copy
import math

import pytest
import torch

from nla_rl.config import SFTConfig
from nla_rl.errors import ConfigError
from nla_rl.optim import build_optimizer, build_scheduler, guarded_step, lr_multiplier


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


def backward(model, scale=1.0):
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    (model(x).pow(2).sum() * scale).backward()


def snapshot(model, optimizer, scheduler):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
            copy.deepcopy(scheduler.state_dict()))


def assert_same_state(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- optimiser

def test_named_parameters_exempt_biases_and_norms_from_decay():
    model = Tiny()
    model.head.weight.requires_grad_(False)
    opt = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(model.proj.bias), id(model.norm.weight),
                                                   id(model.norm.bias)}
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    plain = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == 4


def test_optimizer_refuses_bad_settings():
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(Tiny().parameters(), lr=float("nan"), weight_decay=0.0)
    with pytest.raises(ConfigError, match="no parameters"):
        build_optimizer([], lr=1e-3, weight_decay=0.0)
    frozen = Tiny().requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        build_optimizer(frozen.named_parameters(), lr=1e-3, weight_decay=0.0)


# ---------------------------------------------------------------------------------- schedule

def test_warmup_then_cosine_values():
    kw = dict(warmup_steps=4, total_steps=14, schedule="cosine")
    assert [lr_multiplier(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **kw) == 1.0
    assert math.isclose(lr_multiplier(9, **kw), 0.5, abs_tol=1e-12)  # halfway through the decay
    assert math.isclose(lr_multiplier(14, **kw), 0.0, abs_tol=1e-12)
    assert lr_multiplier(99, **kw) == lr_multiplier(14, **kw)  # clamped past the end
    values = [lr_multiplier(s, **kw) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    assert math.isclose(lr_multiplier(14, **kw, min_ratio=0.1), 0.1)
    assert lr_multiplier(7, warmup_steps=0, total_steps=10, schedule="constant") == 1.0


def test_wsd_holds_the_rate_then_decays_linearly_over_the_last_fifth():
    kw = dict(warmup_steps=2, total_steps=102, schedule="wsd")
    assert [lr_multiplier(s, **kw) for s in range(2)] == [0.5, 1.0]
    assert all(lr_multiplier(s, **kw) == 1.0 for s in range(2, 83))  # 80 of the 100 steps flat
    tail = [lr_multiplier(s, **kw) for s in range(82, 103)]
    assert all(math.isclose(a - b, 1 / 20) for a, b in zip(tail, tail[1:]))  # linear
    assert math.isclose(lr_multiplier(92, **kw), 0.5) and math.isclose(tail[-1], 0.0, abs_tol=1e-12)
    assert math.isclose(lr_multiplier(102, **kw, min_ratio=0.1), 0.1)
    assert SFTConfig(schedule="wsd").schedule == "wsd"


def test_schedule_refuses_bad_settings():
    with pytest.raises(ConfigError, match="schedule"):
        lr_multiplier(0, warmup_steps=0, total_steps=10, schedule="linear")
    with pytest.raises(ConfigError, match="warmup_steps"):
        lr_multiplier(0, warmup_steps=11, total_steps=10)
    with pytest.raises(ConfigError, match="min_ratio"):
        lr_multiplier(0, warmup_steps=0, total_steps=10, min_ratio=2.0)


def test_scheduler_from_sft_config_drives_the_optimizer_lr():
    cfg = SFTConfig(lr=0.1, steps=6, warmup_steps=2, schedule="cosine")
    model = Tiny()
    opt = build_optimizer(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        backward(model)
        seen.append(guarded_step(model.parameters(), opt, sched, max_norm=1.0).lr)
    expected = [0.1 * lr_multiplier(s, warmup_steps=2, total_steps=6, schedule="cosine")
                for s in range(6)]
    assert seen == pytest.approx(expected, abs=1e-12)
    const = build_scheduler(opt, cfg, schedule="constant", warmup_steps=0)
    assert const.get_last_lr()[0] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------- the step

def test_step_clips_to_max_norm_and_reports_the_norm():
    model = Tiny()
    opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0)
    backward(model, scale=100.0)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = {}
    hook = opt.register_step_pre_hook(lambda o, a, k: seen.update(
        norm=float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))))
    result = guarded_step(model.parameters(), opt, None, max_norm=0.5)
    hook.remove()
    assert not result.skipped and result.grad_norm == pytest.approx(expected) and expected > 0.5
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4)  # the optimiser saw clipped gradients
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    assert any(not torch.equal(p, grads[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("precomputed", [False, True])
def test_non_finite_gradients_never_reach_the_weights(bad, precomputed):
    model = Tiny()
    opt = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10, schedule="cosine")
    backward(model)
    assert not guarded_step(model.parameters(), opt, sched, max_norm=1.0).skipped  # builds state
    before = snapshot(model, opt, sched)
    backward(model)
    model.proj.weight.grad[1, 2] = bad
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) if precomputed else None
    result = guarded_step(model.parameters(), opt, sched, max_norm=1.0, grad_norm=norm)
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert all(p.grad is None for p in model.parameters())
    assert_same_state(before, snapshot(model, opt, sched))  # weights, Adam moments, step, LR
    backward(model)  # the next good step proceeds from the untouched state
    after = guarded_step(model.parameters(), opt, sched, max_norm=1.0)
    assert not after.skipped and sched.last_epoch == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_precomputed_norm_is_used_for_clipping():
    model = Tiny()
    opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0)
    backward(model)
    grads = [p.grad.clone() for p in model.parameters()]
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(g=[p.grad.clone() for p in model.parameters()]))
    result = guarded_step(model.parameters(), opt, None, max_norm=1.0, grad_norm=torch.tensor(4.0))
    assert result.grad_norm == 4.0
    for g, s in zip(grads, seen["g"]):
        torch.testing.assert_close(s, g * (1.0 / (4.0 + 1e-6)))
