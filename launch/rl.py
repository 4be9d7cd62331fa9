"""The ``rl`` stage: GRPO on the AV with the AR trained online, on Ray actors.

Reads the SFT models (``<run>/{av_sft,ar_sft}/final``, or the untrained ``<run>/init/*`` when
the SFT stages were not run) and ``<run>/data/rl.parquet`` (+ its hard negatives); builds an
engine pool and two learner groups; runs :func:`actors.coordinator.rl_loop`; checkpoints to
``<run>/rl/{av,ar}/step_NNNNNN`` (resumed with ``run.resume=true``); writes the trained pair to
``<run>/rl/final/{av,ar}`` for export and eval.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from launch.common import (RunPaths, SFTStageError, injection_of, learner_spec, load_progress,
                           save_progress, save_trained, trained_or_initial)
from nla_rl.config import RecipeConfig
from nla_rl.injection import InjectionSpec
from nla_rl.sidecar import ModelSidecar, read_model_sidecar

if TYPE_CHECKING:
    from actors.coordinator import RLWorld

__all__ = ["RLSetup", "RLStart", "build_world", "check_pair", "resume", "rl", "save_both",
           "trained_or_initial", "write_finals"]


@dataclass(frozen=True)
class RLStart:
    """The pair RL starts from: its directories, sidecars and the AV's injection."""

    av_dir: Path
    ar_dir: Path
    av_meta: ModelSidecar
    ar_meta: ModelSidecar
    injection: InjectionSpec


@dataclass
class RLSetup:
    """What :func:`build_world` starts: the loop's world, the pair it starts from, and the actors
    to shut down (last first: a shared placement group after the actors in it)."""

    world: RLWorld
    start: RLStart
    actors: list


def check_pair(av: ModelSidecar, ar: ModelSidecar) -> None:
    """The AV and the AR must read the same activations."""
    for name in ("base_checkpoint", "d_model", "extraction_layer_index", "mse_scale"):
        if getattr(av, name) != getattr(ar, name):
            raise SFTStageError(f"rl: the AV and the AR disagree on {name} ({getattr(av, name)!r} "
                                f"vs {getattr(ar, name)!r}); they must come from the same run")


def rl_learner_spec(cfg: RecipeConfig, role: str, model_dir: Path, meta, injection,
                    reward_basis: Path | None = None):
    """A learner spec for RL: the SFT spec with the RL learning rate, a constant schedule,
    (for the AV with β > 0) a frozen reference policy and (for the AR) the reward basis its
    online loss is measured in."""
    from actors.backends import OptimSpec

    spec, ranks = learner_spec(cfg, f"{role}_sft", model_dir, meta, injection)
    lr = cfg.rl.av_lr if role == "av" else cfg.rl.ar_lr
    optim = OptimSpec(lr=lr, weight_decay=0.0, warmup_steps=0, total_steps=cfg.rl.steps,
                      schedule="constant", grad_clip=spec.optim.grad_clip)
    model = dataclasses.replace(spec.model, with_reference=(
        cfg.rl.kl_beta > 0 if role == "av" else cfg.rl.online_ar and cfg.rl.frozen_ar_every > 0),
        reward_basis=str(reward_basis) if role == "ar" and reward_basis else "")
    ema = cfg.rl.ar_ema_decay if role == "ar" and cfg.rl.online_ar else 0.0
    return dataclasses.replace(spec, model=model, optim=optim, ema_decay=ema), ranks


def learner_placement(cfg: RecipeConfig, colocated, ranks: int) -> dict:
    """A learner group's resource keywords: its own placement group (separate), or bundles
    0..ranks-1 of the shared ``colocated`` one, each rank asking its member's share."""
    if colocated is None:
        return dict(num_cpus_per_rank=cfg.learner.num_cpus_per_rank,
                    num_gpus_per_rank=cfg.learner.num_gpus_per_rank)
    return dict(num_cpus_per_rank=colocated.num_cpus, num_gpus_per_rank=colocated.num_gpus,
                placement_group=colocated.group, bundle_indices=colocated.bundles(ranks))


def build_world(cfg: RecipeConfig, run_dir: Path, tracker) -> RLSetup:
    """Everything the loop needs (``tracker``: the run's, see :class:`nla_rl.tracking.Tracker`)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from actors.cluster import connect_ray, recipe_cpus
    from actors.coordinator import RLWorld
    from actors.deadline import CallDeadline
    from actors.learner import LearnerGroup
    from actors.placement import colocated_for_recipe
    from actors.rollout import pool_from_recipe
    from nla_rl.base_model import check_context
    from nla_rl.checkpoint import CheckpointManager
    from nla_rl.reward_basis import load_reward_basis
    from nla_rl.rl_data import RLData
    from nla_rl.sft import turn_close_ids
    from nla_rl.templates import av_prompt_ids, depth_pct_for
    from rollout.base import RolloutRequest

    run = RunPaths(run_dir)
    av_dir, ar_dir = trained_or_initial(run_dir, "av"), trained_or_initial(run_dir, "ar")
    av_meta, ar_meta = read_model_sidecar(av_dir), read_model_sidecar(ar_dir)
    check_pair(av_meta, ar_meta)
    negatives = cfg.negatives.per_sample if cfg.negatives.enabled else 0
    data = RLData(run.data, seed=cfg.rl_seed, per_sample=negatives)
    injection = injection_of(av_meta, run_dir)
    basis_path = write_reward_basis(cfg, run_dir, data.vectors)
    tokenizer = AutoTokenizer.from_pretrained(av_dir, local_files_only=True)
    av_config = AutoConfig.from_pretrained(av_dir)
    layers = av_config.get_text_config().num_hidden_layers
    prompt = av_prompt_ids(tokenizer, av_meta.av_template, av_meta.marker.char,
                           depth_pct=depth_pct_for(av_meta.av_template,
                                                   av_meta.extraction_layer_index, layers),
                           prefill=cfg.templates.av_prefill)
    check_context(av_config, len(prompt), cfg.rl.max_new_tokens, "rl.max_new_tokens")
    eos = {tokenizer.eos_token_id, *turn_close_ids(tokenizer)} - {None}

    connect_ray(num_cpus=recipe_cpus(cfg))
    started = []  # shut down last first: a shared placement group after the actors in it
    deadline = CallDeadline.from_run(cfg.run)  # one for every actor: fed the loop's step times
    try:
        colocated = colocated_for_recipe(cfg)  # None: learner.placement=separate
        if colocated is not None:
            started.append(colocated)
        engines = pool_from_recipe(cfg, model_dir=str(av_dir), marker=av_meta.marker,
                                   injection=injection,
                                   max_model_len=len(prompt) + cfg.rl.max_new_tokens + 16,
                                   num_cpus_per_engine=cfg.learner.num_cpus_per_rank,
                                   colocated=colocated, deadline=deadline)
        started.append(engines)
        groups = {}
        for role, model_dir, meta in (("av", av_dir, av_meta), ("ar", ar_dir, ar_meta)):
            spec, ranks = rl_learner_spec(cfg, role, model_dir, meta,
                                          injection if role == "av" else None, basis_path)
            # The AR is committed before the AV (save_both), so it keeps one more: a crash
            # between the two commits still leaves the AR of the AV's newest step on disk.
            keep = cfg.rl.keep_last + (role == "ar")
            manager = CheckpointManager.for_recipe(run.stage(f"rl_{role}"), cfg, f"rl_{role}",
                                                   keep_last=keep)
            groups[role] = LearnerGroup(spec, world_size=ranks, name=f"rl_{role}",
                                        checkpoints=manager, deadline=deadline,
                                        **learner_placement(cfg, colocated, ranks))
            started.append(groups[role])
    except BaseException:
        for actor in reversed(started):
            actor.shutdown()
        raise
    probe_completion = tokenizer("<explanation>\nprobe of the weight sync\n</explanation>",
                                 add_special_tokens=False)["input_ids"]
    probe = ([RolloutRequest(prompt, torch.from_numpy(data.vectors[0]), "probe")],
             [probe_completion])
    tolerance = cfg.rl.sync_tolerance or (2e-3 if cfg.model.dtype == "float32" else 0.15)
    world = RLWorld(cfg=cfg, policy=groups["av"], critic=groups["ar"], engines=engines, data=data,
                    tracker=tracker, prompt_ids=prompt,
                    prefill=cfg.templates.av_prefill, eos_ids=frozenset(eos),
                    mse_scale=av_meta.mse_scale, probe=probe,
                    basis=None if basis_path is None else load_reward_basis(basis_path),
                    sync_tolerance=tolerance, deadline=deadline, checkpoint=save_both,
                    adapter_dir=str(run.rl / "adapter"))
    return RLSetup(world, RLStart(av_dir, ar_dir, av_meta, ar_meta, injection), started)


def write_reward_basis(cfg: RecipeConfig, run_dir: Path, vectors: np.ndarray) -> Path | None:
    """Fit ``rl.reward_basis`` on the RL split's activations and write it to
    ``<run>/rl/reward_basis.safetensors`` (None for raw). The fit is deterministic, so a resumed
    run writes the same basis again."""
    import torch

    from nla_rl.reward_basis import BASIS_FILE, fit_reward_basis

    basis = fit_reward_basis(torch.from_numpy(np.asarray(vectors)), cfg.rl.reward_basis,
                             cfg.rl.reward_basis_eps)
    return None if basis is None else basis.save(RunPaths(run_dir).rl / BASIS_FILE)


def save_both(world, step: int, skipped: float) -> None:
    """Checkpoint both learners; the policy's checkpoint carries the data cursor and progress.
    The AR first: :func:`resume` takes the newest step both reached, so a crash in between costs
    one save interval, never the run."""
    from actors.rollouts_ahead import INFLIGHT_FILE, saved_rollouts
    from nla_rl.atomic import atomic_write_json

    ahead = getattr(world, "ahead", None)  # rl.async_level ≥ 1: rollouts generated ahead

    def extra(staging: Path) -> None:
        cursor, inflight = ahead.checkpoint_state(step) if ahead else (world.data.cursor, [])
        save_progress(staging, cursor, step, skipped)
        if inflight:  # finished by policy versions the checkpoint no longer has
            atomic_write_json(staging / INFLIGHT_FILE, saved_rollouts(ahead.level, inflight))

    basis = world.critic.spec.model.reward_basis  # the AR's checkpoint carries its loss's basis
    world.critic.save(step, extra_files=(lambda staging: shutil.copyfile(
        basis, staging / Path(basis).name)) if basis else None)
    world.policy.save(step, extra_files=extra)


def resume(world, cfg: RecipeConfig) -> int:
    """Restore both learners and the data cursor from the newest step both have a checkpoint of
    (a crash between the AR's and the AV's commit leaves the AR one step ahead: that orphan is
    ignored, and replaced when the run saves that step again); returns the first step to run."""
    from actors.rollouts_ahead import INFLIGHT_FILE
    from nla_rl.checkpoint import CheckpointError, newest_complete_set

    if not cfg.run.resume:
        return 0
    managers = {"AV": world.policy.checkpoints, "AR": world.critic.checkpoints}
    try:
        found = newest_complete_set(managers)
    except CheckpointError as err:
        raise SFTStageError(f"rl: {err}") from None
    if found is None:
        return 0
    step, paths = found
    for name, manager in managers.items():
        newer = [s for s in manager.steps() if s > step]
        if newer:
            print(f"[rl] ignoring {name} checkpoint(s) {newer} newer than the newest complete "
                  f"AV/AR pair (a crash between the two commits)")
    world.policy.load_state(paths["AV"])
    world.critic.load_state(paths["AR"])
    progress = load_progress(paths["AV"], num_items=len(world.data.vectors), seed=cfg.rl_seed)
    world.data.cursor = progress.cursor
    world.skipped_steps = progress.skipped_steps
    inflight = paths["AV"] / INFLIGHT_FILE
    world.restored_rollouts = json.loads(inflight.read_text()) if inflight.is_file() else None
    print(f"[rl] resumed from {paths['AV']} and {paths['AR']} (step {progress.step})")
    return progress.step


def rl(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """Run (or resume) GRPO and write ``<run>/rl/final/{av,ar}``; one console line per step."""
    from nla_rl.console import StepConsole

    with tracker.showing(StepConsole("rl", cfg.rl.steps)):
        _rl(cfg, run_dir, tracker)


def _rl(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    from actors.coordinator import rl_loop, sync_engines

    setup = build_world(cfg, run_dir, tracker)
    world = setup.world
    try:
        start = resume(world, cfg)
        world.tracker.rewind(start, stage="rl")  # steps after `start` are logged again
        if start:
            sync_engines(world)  # the engines still hold the SFT weights
        rl_loop(world, start)
        write_finals(cfg, run_dir, world, setup.start)
        if world.sync_seconds:
            print(f"[rl] weight sync: mean {np.mean(world.sync_seconds):.3f}s")
    finally:
        for actor in reversed(setup.actors):  # the shared placement group (if any) last
            actor.shutdown()


def write_finals(cfg: RecipeConfig, run_dir: Path, world: RLWorld, start: RLStart) -> None:
    """``<run>/rl/final/{av,ar}``: the trained pair as HF directories with their sidecars."""
    run = RunPaths(run_dir)
    training = {"steps": cfg.rl.steps, "av_lr": cfg.rl.av_lr, "ar_lr": cfg.rl.ar_lr,
                "group_size": cfg.rl.group_size, "prompts_per_step": cfg.rl.prompts_per_step,
                "negatives": cfg.negatives.enabled, "backend": cfg.learner.backend}
    data = str(run.split("rl"))
    save_trained(cfg, world.policy, "av", start.av_dir, start.av_meta, run.final("rl", "av"),
                 stage="rl", injection=start.injection, trained_on=data, training=training,
                 lora=world.policy.spec.model.lora)
    save_trained(cfg, world.critic, "ar", start.ar_dir, start.ar_meta, run.final("rl", "ar"),
                 stage="rl", injection=None, trained_on=data, training=training,
                 reward_basis=world.critic.spec.model.reward_basis or None)
