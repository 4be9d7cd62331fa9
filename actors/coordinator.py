"""The GRPO coordinator: one RL step, as the paper describes it, over Ray actors.

    batch    = data.next_batch()                     activations + drawn hard negatives
    rollouts = generate(batch)                       G samples each, injection at the marker
                                                     (ahead, by an older policy, at
                                                     rl.async_level ≥ 1: actors.rollouts_ahead)
    preds    = critic.reconstruct(explanations)      the live AR
    scored   = step_rewards(preds, gold, negatives)  −MSE (or −log MSE), penalties, contrast
    adv      = compute_advantages(scored.rewards)    GRPO / Dr.GRPO within each group
    train policy (GRPO) and critic (online AR) concurrently; sync the engines (verified) as soon
    as the policy is done; log, checkpoint

The helpers below are each one named piece of that list; one step (:func:`rl_step`) fits on
one screen. Everything that touches a model lives in an actor; this process holds only numbers.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from actors.rollout import RolloutPool, replacement_metrics
from actors.rollouts_ahead import RolloutsAhead, Taken
from nla_rl.config import RecipeConfig
from nla_rl.data.toyworld import score_explanation
from nla_rl.grpo import PolicyLossSettings, compute_advantages
from nla_rl.health import check_step0_health, rollout_health
from nla_rl.metrics import cosine, fve, gold_spread, hard_negative_gap
from nla_rl.reward_basis import RewardBasis, apply_basis
from nla_rl.rewards import normalized_mse
from nla_rl.rl_batch import trim_at_eos
from nla_rl.rl_data import RLBatch, RLData
from nla_rl.rl_rewards import step_rewards
from nla_rl.templates import extract_explanation
from nla_rl.tracking import Tracker
from nla_rl.truth import RewardTruthAlarm, diversity_metrics, toy_rollout_metrics
from rollout.base import RolloutRequest, Sample, SamplingSpec

if TYPE_CHECKING:
    from actors.deadline import CallDeadline
    from actors.learner import LearnerGroup


@dataclass
class RLWorld:
    """Everything the loop talks to: the actors, the data, the prompt, the tracker."""

    cfg: RecipeConfig
    policy: LearnerGroup  # role av
    critic: LearnerGroup  # role ar
    engines: RolloutPool
    data: RLData
    tracker: Tracker
    prompt_ids: list[int]
    prefill: str
    eos_ids: frozenset[int]
    mse_scale: float | None
    basis: RewardBasis | None = None  # the reward's basis (rl.reward_basis; None = raw)
    probe: tuple = ()  # (requests, completions) for the weight-sync verification
    sync_tolerance: float = 2e-3
    checkpoint: Callable[[RLWorld, int, float], None] | None = None  # (world, step, skipped)
    adapter_dir: str = ""  # LoRA runs: where the synced adapter is written for the engines
    skipped_steps: float = 0.0
    sync_seconds: list = field(default_factory=list)
    alarm: RewardTruthAlarm | None = None  # reward-vs-truth alarm (built from the recipe)
    warn: Callable[[str], object] = print  # where the alarm's warning goes (the console)
    deadline: CallDeadline | None = None  # the actors share it; the loop feeds it step times
    ahead: RolloutsAhead | None = None  # set by rl_loop: the batches generated ahead
    restored_rollouts: dict | None = None  # finished rollouts a resumed checkpoint saved

    def __post_init__(self):
        if self.alarm is None:
            self.alarm = RewardTruthAlarm(window=self.cfg.rl.alarm_window)

    @functools.cached_property
    def fve_spread(self) -> float:
        """The denominator of every step's FVE, measured once on the whole RL split: a step's
        8 activations measure their own spread badly (:func:`nla_rl.metrics.fve`)."""
        return gold_spread(self.data.vectors, self.mse_scale)

    def save(self, step: int, skipped: float) -> None:
        """Checkpoint both learners at ``step`` (with ``checkpoint``; none: nothing is saved)."""
        if self.checkpoint is not None:
            self.checkpoint(self, step, skipped)


@dataclass
class Rollouts:
    """Flat over P activations × G samples (sample j of activation i at i·G + j)."""

    completions: list[list[int]]
    engine_logp: list[list[float]]
    texts: list[str]
    explanations: list[str | None]
    finish_reasons: list[str]
    group_ids: np.ndarray
    golds: np.ndarray  # [N, d] float32: each rollout's gold activation
    injection_applied: int
    seconds: float  # the generation's wall time
    version: int = 0  # the policy version that generated them (see actors.rollouts_ahead)


def engine_samples(world: RLWorld, batch: RLBatch, step: int) -> list[list[Sample]]:
    """G samples per activation of ``batch`` from the engine pool, seeded by ``step``."""
    rl = world.cfg.rl
    requests = [RolloutRequest(world.prompt_ids, torch.from_numpy(v), f"{step}:{r}")
                for v, r in zip(batch.vectors, batch.rows)]
    sampling = SamplingSpec(n=rl.group_size, temperature=rl.temperature, top_p=rl.top_p,
                            max_new_tokens=rl.max_new_tokens,
                            seed=world.cfg.rl_seed * 1_000_003 + step * len(requests))
    return world.engines.generate(requests, sampling)


def as_rollouts(world: RLWorld, taken: Taken) -> Rollouts:
    """A step's engine samples as :class:`Rollouts`, trimmed at the first EOS."""
    samples = [s for group in taken.samples for s in group]
    completions = [trim_at_eos(s.token_ids, world.eos_ids) for s in samples]
    texts = [world.prefill + s.text for s in samples]
    g = world.cfg.rl.group_size
    return Rollouts(
        completions, [list(s.logprobs[:len(c)]) for s, c in zip(samples, completions)], texts,
        [extract_explanation(t) for t in texts], [s.finish_reason for s in samples],
        np.repeat(np.arange(len(taken.samples)), g), np.repeat(taken.batch.vectors, g, axis=0),
        sum(bool(s.injection_applied) for s in samples), taken.generate_s, taken.version)


def score(world: RLWorld, batch: RLBatch, rollouts: Rollouts, preds: torch.Tensor, step: int):
    """Rewards of every rollout against its gold activation (and drawn hard negatives)."""
    g = world.cfg.rl.group_size
    gold = torch.from_numpy(rollouts.golds)
    negatives = None if batch.negatives is None else torch.from_numpy(
        np.repeat(batch.negatives, g, axis=0))
    failed = [e is None for e in rollouts.explanations]
    preds = [None if f else p for f, p in zip(failed, preds)]
    return step_rewards(preds, gold, rollouts.completions, rollouts.finish_reasons, world.cfg.rl,
                        scale=world.mse_scale, eos_token_ids=sorted(world.eos_ids),
                        negatives_cfg=world.cfg.negatives if negatives is not None else None,
                        hard_negatives=negatives, group_ids=torch.from_numpy(rollouts.group_ids),
                        seed=world.cfg.rl_seed, step=step, basis=world.basis)


def policy_rows(world: RLWorld, rollouts: Rollouts, advantages, keep, old_logp) -> dict:
    """The policy learner's rows: one per kept rollout (capped rollouts stay: keep is True)."""
    rl = world.cfg.rl
    idx = np.flatnonzero(np.asarray(keep))
    rows = {"prompts": [world.prompt_ids] * len(idx),
            "completions": [rollouts.completions[i] for i in idx],
            "vectors": rollouts.golds[idx], "advantages": np.asarray(advantages, np.float32)[idx],
            "engine_logp": [rollouts.engine_logp[i] for i in idx],
            "old_logp": [old_logp[i] for i in idx],
            "temperature": float(rl.temperature), "settings": PolicyLossSettings.from_rl(rl)}
    if rl.kl_beta > 0:
        ref = world.policy.av_logprobs(rows["prompts"], rows["completions"], rows["vectors"],
                                       reference=True, temperature=rl.temperature)
        rows["ref_logp"] = [r.tolist() for r in ref]
    return _trim_to_ranks(rows, world.policy.world_size)


def critic_rows(world: RLWorld, rollouts: Rollouts) -> dict | None:
    """The online AR's rows: each extracted explanation against its gold activation."""
    idx = [i for i, e in enumerate(rollouts.explanations) if e is not None]
    rows = {"explanations": [rollouts.explanations[i] for i in idx],
            "vectors": rollouts.golds[idx]}
    rows = _trim_to_ranks(rows, world.critic.world_size)
    return rows if rows["explanations"] else None


def _trim_to_ranks(rows: dict, ranks: int) -> dict:
    """Drop the last few rows so every rank gets the same number (at most ranks-1 dropped)."""
    n = next(len(v) for v in rows.values() if isinstance(v, (list, np.ndarray)))
    keep = n - n % ranks
    return {k: (v[:keep] if isinstance(v, (list, np.ndarray)) else v) for k, v in rows.items()}


def train_both(world: RLWorld, p_rows: dict, c_rows: dict | None, verify_sync: bool = True,
               ahead: RolloutsAhead | None = None, step: int = 0) -> tuple[dict, dict, dict]:
    """The policy's GRPO step and the critic's online step, at the same time; the engines are
    synced as soon as the policy's step is done, while the critic may still be training. With
    ``ahead``, the push waits for the rollouts in flight and the next batch starts after it."""
    def policy_then_sync():
        stats = world.policy.train_step(p_rows, loss="grpo") if p_rows["completions"] else {}
        synced = sync_engines(world, verify=verify_sync,
                              before_push=ahead.wait_inflight if ahead else None)
        if ahead is not None:
            ahead.submit_after_sync(step)
        return stats, synced

    with ThreadPoolExecutor(max_workers=2) as pool:
        policy = pool.submit(policy_then_sync)
        critic = pool.submit(world.critic.train_step, c_rows, loss="ar_sft") \
            if c_rows is not None and world.cfg.rl.online_ar else None
        av_stats, synced = policy.result()
        return av_stats, (critic.result() if critic else {}), synced


def sync_engines(world: RLWorld, verify: bool = True,
                 before_push: Callable[[], object] | None = None) -> dict:
    """Push the policy's weights to every engine and, with ``verify``, prove they arrived: the
    engines' log-probs of a fixed probe must equal the learner's (a silent no-op sync raises
    here). The learner computes its probe log-probs while the engines load the weights.
    ``before_push``: called between the gather and the push (rollouts generated ahead finish on
    the old weights while the new ones are gathered); ``perf/sync_wait_s`` is its wait."""
    started = time.perf_counter()
    lora = world.policy.spec.model.lora
    # LoRA: only the adapter is gathered (the frozen base never changes on the engines).
    state = world.policy.trainable_state_dict(phase="sync weights") if lora.rank > 0 else \
        world.policy.full_state_dict(phase="sync weights")
    gathered = time.perf_counter()
    if before_push is not None:
        before_push()
    waited = time.perf_counter() - gathered
    requests, completions = world.probe
    with ThreadPoolExecutor(max_workers=1) as pool:
        expected = pool.submit(world.policy.av_logprobs, [list(r.prompt_ids) for r in requests],
                               completions, np.stack([r.vector.numpy() for r in requests])) \
            if verify else None
        if lora.rank > 0:  # only the adapter travels; engines merge it on their side
            world.engines.sync_adapter(save_adapter(state, lora, world.adapter_dir))
        else:
            world.engines.sync_weights(state.items())
        metrics = {}
        if expected is not None:
            metrics["health/sync_logp_delta"] = world.engines.verify_sync(
                [e.tolist() for e in expected.result()], world.probe, world.sync_tolerance)
    seconds = time.perf_counter() - started - waited
    world.sync_seconds.append(seconds)
    return {"perf/sync_s": seconds, "perf/sync_gather_s": gathered - started,
            "perf/sync_wait_s": waited, **metrics}


def save_adapter(state: dict, lora, out_dir) -> str:
    """The LoRA tensors of a peft-wrapped state dict as a peft adapter directory, which vLLM
    loads in place. Written through :func:`nla_rl.atomic.atomic_dir`: a crash mid-write leaves
    the previous adapter (which a replacement engine re-reads) whole."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from nla_rl.atomic import atomic_dir

    tensors = {k.replace(".default", ""): v.contiguous() for k, v in state.items() if "lora_" in k}
    with atomic_dir(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                   use_rslora=lora.use_rslora, target_modules=list(lora.target_modules),
                   task_type="CAUSAL_LM").save_pretrained(str(tmp))
    return str(out_dir)


def frozen_predictions(world: RLWorld, rollouts: Rollouts, step: int) -> torch.Tensor | None:
    """The frozen AR-SFT final's ĥ of every rollout on the steps ``rl.frozen_ar_every`` picks
    (None otherwise); without an online AR the live AR is the frozen one, so no second pass."""
    rl = world.cfg.rl
    if not rl.online_ar or rl.frozen_ar_every == 0 or step % rl.frozen_ar_every:
        return None
    return world.critic.reconstruct([e or "" for e in rollouts.explanations], reference=True)


def truth_metrics(world: RLWorld, batch: RLBatch, rollouts: Rollouts, preds: torch.Tensor,
                  frozen: torch.Tensor | None) -> dict:
    """``rollout/fve`` (the scoring AR) and ``rollout/fve_frozen_ar``, both against the RL split's
    spread (:attr:`RLWorld.fve_spread`), ``rollout/diversity/*`` and,
    with ground truth, ``rollout/toy/*`` (see :mod:`nla_rl.truth`)."""
    ok = [i for i, e in enumerate(rollouts.explanations) if e is not None]
    g = world.cfg.rl.group_size
    metrics = diversity_metrics(rollouts.explanations, g)
    if len(ok) > 1:
        gold = torch.from_numpy(rollouts.golds[ok])
        spread = world.fve_spread
        metrics["rollout/fve"] = fve(preds[ok], gold, world.mse_scale, spread)
        if not world.cfg.rl.online_ar:
            metrics["rollout/fve_frozen_ar"] = metrics["rollout/fve"]
        elif frozen is not None:
            metrics["rollout/fve_frozen_ar"] = fve(frozen[ok], gold, world.mse_scale, spread)
    if batch.attributes is not None:
        truths = [batch.attributes[i // g] for i in range(len(rollouts.explanations))]
        metrics.update(toy_rollout_metrics(rollouts.explanations, truths))
    return metrics


def step_metrics(world, rollouts, scored, adv, preds, av_stats, ar_stats, old_logp):
    """Every metric of a step, under the stable groups."""
    gold = torch.from_numpy(rollouts.golds)
    ok = [i for i, e in enumerate(rollouts.explanations) if e is not None]
    health = rollout_health(rollouts.texts, rollouts.explanations,
                            injection_applied=rollouts.injection_applied,
                            injection_expected=len(rollouts.texts),
                            learner_logp=_pad(old_logp), engine_logp=_pad(rollouts.engine_logp),
                            mask=_pad_mask(rollouts.completions), skipped_steps=world.skipped_steps)
    metrics = {**scored.metrics, **health, "perf/generate_s": rollouts.seconds,
               "rollout/zero_variance_groups": float(adv.zero_variance_groups),
               "reward/group_std": adv.group_std_mean}  # vs rl.advantage_eps
    if ok:
        metrics["rollout/cosine"] = float(cosine(preds[ok], gold[ok]).mean())
    for role, stats in (("av", av_stats), ("ar", ar_stats)):
        for key in ("loss", "grad_norm", "lr"):
            if key in stats:
                metrics[f"train/{role}/{key}"] = float(stats[key])
        for key, value in stats.get("loss_stats", {}).items():  # GRPO: clip_frac, kl, …
            metrics[f"train/{role}/{key}"] = float(value)
        if "compute_s" in stats:  # rank 0's forward/backward/optimiser seconds
            metrics[f"perf/{role}/compute_s"] = float(stats["compute_s"])
    return metrics


def _timed(seconds: dict, name: str, work):
    """``work()``, its wall time stored as ``seconds[name]``."""
    started = time.perf_counter()
    out = work()
    seconds[name] = time.perf_counter() - started
    return out


def _pad(rows: list) -> torch.Tensor:
    width = max([len(r) for r in rows] + [1])
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.float32)
    return out


def _pad_mask(rows: list) -> torch.Tensor:
    width = max([len(r) for r in rows] + [1])
    out = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = True
    return out


def samples_table(batch: RLBatch, rollouts: Rollouts, scored, preds: torch.Tensor, g: int,
                  mse_scale: float | None, limit: int = 16, basis=None) -> list:
    """Rows of the sample table: the first sample of the first ``limit`` activations (MSE and
    gap in the reward's basis, as the reward saw them)."""
    out = []
    for i in range(min(limit, len(batch.rows))):
        j = i * g
        gold = torch.from_numpy(batch.vectors[i:i + 1])
        row = {"activation_id": int(batch.rows[i]), "explanation": rollouts.texts[j],
               "reward": float(scored.rewards[j]), "mse": None, "gap": None,
               "policy_version": rollouts.version}
        if batch.attributes is not None:  # toy world: is what it says true?
            recall, precision = score_explanation(rollouts.explanations[j], batch.attributes[i])
            row.update(truth=" ".join(sorted(batch.attributes[i])), toy_recall=recall,
                       toy_precision=None if math.isnan(precision) else precision)
        if rollouts.explanations[j] is not None:
            pred, gold = apply_basis(basis, preds[j:j + 1]), apply_basis(basis, gold)
            row["mse"] = float(normalized_mse(pred, gold, mse_scale)[0])
            if batch.negatives is not None:
                negs = apply_basis(basis, torch.from_numpy(batch.negatives[i]))
                row["gap"] = hard_negative_gap(pred, gold, negs.unsqueeze(0))
        out.append(row)
    return out


def rollouts_ahead(world: RLWorld, start: int) -> RolloutsAhead:
    """The queue of batches generated ahead at ``rl.async_level`` (level 0: none), continuing
    any finished rollouts the resumed checkpoint saved (``world.restored_rollouts``)."""
    rl = world.cfg.rl
    return RolloutsAhead(
        rl.async_level, steps=rl.steps, start=start,
        draw=lambda step: world.data.next_batch(rl.prompts_per_step, step),
        generate=lambda batch, step: engine_samples(world, batch, step),
        cursor=lambda: world.data.cursor, restored=world.restored_rollouts, warn=world.warn)


def rl_loop(world: RLWorld, start: int) -> None:
    """Steps ``start .. rl.steps - 1``; each one as in the module docstring (at
    ``rl.async_level`` ≥ 1 the next batches are generated during the update: see
    :mod:`actors.rollouts_ahead`)."""
    world.ahead = rollouts_ahead(world, start)
    try:
        for step in range(start, world.cfg.rl.steps):
            rl_step(world, step, first=step == start)
    finally:
        world.ahead.close()


def rl_step(world: RLWorld, step: int, first: bool) -> None:
    """One RL step (``first``: the first of this process, where the sync is always verified
    and the step-0 health check runs)."""
    rl, ahead = world.cfg.rl, world.ahead
    started = time.perf_counter()
    taken = ahead.take(step)
    batch, rollouts = taken.batch, as_rollouts(world, taken)
    seconds = {"perf/generate_wait_s": taken.wait_s}  # perf/*_s of the phases (bench/p2, p8)
    preds = _timed(seconds, "perf/reconstruct_s", lambda: world.critic.reconstruct(
        [e or "" for e in rollouts.explanations], ema=world.critic.spec.ema_decay > 0))
    frozen = _timed(seconds, "perf/frozen_ar_s", lambda: frozen_predictions(
        world, rollouts, step))
    scored = score(world, batch, rollouts, preds, step)
    adv = compute_advantages(scored.rewards, rl.advantage,
                             torch.from_numpy(rollouts.group_ids), eps=rl.advantage_eps)
    old_logp = _timed(seconds, "perf/old_logp_s", lambda: [lp.tolist() for lp in (
        world.policy.av_logprobs([world.prompt_ids] * len(rollouts.completions),
                                 rollouts.completions, rollouts.golds,
                                 temperature=rl.temperature))])
    p_rows = _timed(seconds, "perf/ref_logp_s", lambda: policy_rows(  # kl_beta > 0: ref fwd
        world, rollouts, adv.advantages, scored.keep, old_logp))
    verify = first or (step + 1) % rl.verify_sync_every == 0
    av_stats, ar_stats, synced = _timed(seconds, "perf/train_s", lambda: train_both(
        world, p_rows, critic_rows(world, rollouts), verify_sync=verify, ahead=ahead, step=step))
    world.skipped_steps += av_stats.get("skipped", 0.0) + ar_stats.get("skipped", 0.0)
    metrics = {**step_metrics(world, rollouts, scored, adv, preds, av_stats, ar_stats,
                              old_logp), **truth_metrics(world, batch, rollouts, preds, frozen),
               **seconds, **synced, "rollout/policy_version": float(rollouts.version),
               "rollout/staleness": float(step - rollouts.version)}
    alarm, warning = world.alarm.check(metrics)
    metrics.update(alarm)
    if warning:
        world.warn(f"WARNING step {step + 1}: {warning}")
    if first and rl.stop_on_unhealthy:
        check_step0_health(metrics)  # broken injection or >50% failures: stop now
    metrics.update(replacement_metrics(world.engines.drain_replacements(), step + 1))
    metrics.update(world.engines.heartbeat())  # health/engine_{last_call,deadline}_s
    metrics["perf/step_s"] = time.perf_counter() - started
    if world.deadline is not None:
        world.deadline.observe(metrics["perf/step_s"])
    world.tracker.log(step + 1, metrics, stage="rl")
    if (step + 1) % rl.samples_every == 0 or step + 1 == rl.steps:
        world.tracker.log_samples(step + 1, samples_table(
            batch, rollouts, scored, preds, rl.group_size, world.mse_scale, basis=world.basis))
    if (step + 1) % rl.save_every == 0 or step + 1 == rl.steps:
        world.save(step + 1, world.skipped_steps)
