"""The supervised stages ``ar_sft`` and ``av_sft``: train the initial AR / AV on a learner group.

Each reads ``<run>/data/<stage>.parquet`` (+ ``eval.parquet`` for held-out metrics) and the
initial model ``<run>/init/<role>`` written by ``prepare``; checkpoints go to
``<run>/<stage>/step_NNNNNN/`` (resumed with ``run.resume=true``) and the trained model to
``<run>/<stage>/final/`` (an HF directory + ``nla_meta.yaml``), which RL and export read.

Metrics (``<run>/logs/metrics.jsonl``, and W&B as ``<stage>/…`` against ``<stage>/step`` when
enabled; :mod:`nla_rl.tracking`): ``train/<role>/{loss,grad_norm,lr}``,
``perf/<role>/tokens_per_s``, ``health/skipped_steps``; the AR adds ``train/ar/fve`` (from the
batch's fit term: the loss without ``ar_sft.loss_basis``'s term) and ``eval/ar/fve``; the AV
adds the real-vs-shuffled control ``train/av/{shuffled_loss,shuffle_gap}`` and
``eval/av/{loss,shuffled_loss,shuffle_gap}`` (gap = shuffled − real loss; positive when the AV
uses the injected activation).

``ar_sft.loss_basis`` (not raw): the basis of the AR loss's second term is fitted on the AR-SFT
split at the start of the stage and written to ``<run>/ar_sft/loss_basis.safetensors``; the
final AR's sidecar records it under ``training.loss_basis`` (a training detail: the AR's
scoring basis, ``extraction.reward_basis``, is not set by it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from launch.common import (ROLE_OF, Progress, RunPaths, SFTStageError, Split, injection_of,  # noqa: F401
                           learner_spec, load_progress, load_split, save_progress, save_trained)
from nla_rl.config import RecipeConfig
from nla_rl.metrics import fve_from_error, gold_spread
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sidecar import ModelSidecar, read_model_sidecar

LOSS_BASIS_FILE = "loss_basis.safetensors"  # ar_sft.loss_basis, in <run>/ar_sft/


# ---------------------------------------------------------------------------------- metrics

def av_control(group, rows: dict, *, seed: int, prefix: str) -> dict:
    """Real vs shuffled loss on the same rows (no update): the AV's use of the activation."""
    real = group.evaluate(rows, loss="av_sft")["loss"]
    fake = group.evaluate({**rows, "shuffle_seed": seed}, loss="av_sft_shuffled")["loss"]
    return {f"{prefix}/av/loss": real, f"{prefix}/av/shuffled_loss": fake,
            f"{prefix}/av/shuffle_gap": fake - real}


def held_out(group, role: str, held: Split | None, *, rows: int, world: int, mse_scale,
             seed: int) -> dict:
    """Held-out metrics on the first ``rows`` eval rows (a multiple of the ranks)."""
    from nla_rl.metrics import fve

    n = min(rows, len(held.explanations)) // world * world if held is not None else 0
    if n < 2 * world:  # too few eval rows for a derangement on every rank
        return {}
    batch = held.rows(range(n))
    if role == "ar":
        preds = group.reconstruct(batch["explanations"])
        return {"eval/ar/fve": fve(preds, torch.from_numpy(batch["vectors"]), mse_scale)}
    return av_control(group, batch, seed=seed, prefix="eval")


# -------------------------------------------------------------------------------- the stage

def run_sft(cfg: RecipeConfig, run_dir: Path, stage: str, tracker) -> Path:
    """Train ``stage``'s role, logging to the run's ``tracker``; returns the ``final/`` directory."""
    from actors.cluster import connect_ray, recipe_cpus
    from actors.deadline import CallDeadline
    from actors.learner import LearnerGroup
    from nla_rl.checkpoint import CheckpointManager

    role, sft = ROLE_OF[stage], getattr(cfg, stage)
    run = RunPaths(run_dir)
    init_dir = run.init(role)
    if not (init_dir / "nla_meta.yaml").is_file():
        raise SFTStageError(f"{stage}: no initial {role.upper()} at {init_dir}; the prepare stage "
                            "writes it (run.stages must include prepare first)")
    meta = read_model_sidecar(init_dir)
    train = load_split(run.split(stage), init=meta, stage=stage)
    eval_path = run.split("eval")
    held = load_split(eval_path, init=meta, stage=stage) if eval_path.is_file() else None
    injection = injection_of(meta, run_dir) if role == "av" else None
    spec, ranks = learner_spec(cfg, stage, init_dir, meta, injection)
    if role == "ar":
        spec = with_loss_basis(cfg, spec, train.vectors, run.stage(stage))
        spec = with_contrast_bank(cfg, spec, train.vectors, run.stage(stage))
    manager = CheckpointManager.for_recipe(run.stage(stage), cfg, stage, keep_last=sft.keep_last)
    connect_ray(num_cpus=recipe_cpus(cfg))
    group = LearnerGroup(spec, world_size=ranks, num_cpus_per_rank=cfg.learner.num_cpus_per_rank,
                         num_gpus_per_rank=cfg.learner.num_gpus_per_rank, name=stage,
                         checkpoints=manager, deadline=CallDeadline.from_run(cfg.run))
    try:
        _train(cfg, stage, group, train, held, meta, tracker)
        return write_final(cfg, run_dir, stage, group, meta, injection, spec)
    finally:
        group.shutdown()


def with_loss_basis(cfg: RecipeConfig, spec, vectors, stage_dir: Path):
    """``spec`` with ``ar_sft.loss_basis`` fitted on the AR-SFT split's activations and written
    to ``<stage_dir>/loss_basis.safetensors`` (a deterministic fit: a resumed run writes the
    same file); ``spec`` unchanged for raw."""
    from nla_rl.reward_basis import fit_reward_basis

    sft = cfg.ar_sft
    basis = fit_reward_basis(torch.from_numpy(np.asarray(vectors)), sft.loss_basis,
                             sft.loss_basis_eps)
    if basis is None:
        return spec
    path = basis.save(stage_dir / LOSS_BASIS_FILE)
    print(f"[ar_sft] loss: raw + {sft.loss_basis_weight:g} × {sft.loss_basis} basis "
          f"(ε {sft.loss_basis_eps:g}, fitted on {len(vectors)} rows) → {path}")
    model = dataclasses.replace(spec.model, loss_basis=str(path),
                                loss_basis_weight=sft.loss_basis_weight)
    return dataclasses.replace(spec, model=model)


def with_contrast_bank(cfg: RecipeConfig, spec, vectors, stage_dir: Path):
    """``spec`` with ``ar_sft.contrast_weight``'s bank (at most ``contrast_bank_rows`` AR-SFT
    rows, sampled by ``run.seed``) written to ``<stage_dir>/contrast_bank.safetensors``;
    ``spec`` unchanged when the weight is 0."""
    from nla_rl.sft import CONTRAST_FILE, fit_contrast_bank, save_contrast_bank

    sft = cfg.ar_sft
    if sft.contrast_weight == 0:
        return spec
    bank, mean = fit_contrast_bank(torch.from_numpy(np.asarray(vectors)),
                                   sft.contrast_bank_rows, cfg.run.seed)
    path = stage_dir / CONTRAST_FILE
    save_contrast_bank(bank, mean, path)
    print(f"[ar_sft] loss: + {sft.contrast_weight:g} × InfoNCE against {len(bank)} AR-SFT rows "
          f"(τ {sft.contrast_tau:g}) → {path}")
    model = dataclasses.replace(spec.model, contrast_bank=str(path),
                                contrast_weight=sft.contrast_weight, contrast_tau=sft.contrast_tau)
    return dataclasses.replace(spec, model=model)


def _resume(cfg, group, train: Split) -> Progress:
    """The first step, data cursor and skipped steps so far: from the latest valid checkpoint
    when ``run.resume`` is on and there is one, else a fresh start."""
    from nla_rl.checkpoint import DataCursor

    path = group.load() if cfg.run.resume else None
    if path is None:
        return Progress(0, DataCursor(len(train.explanations), cfg.run.seed), 0.0)
    progress = load_progress(path, num_items=len(train.explanations), seed=cfg.run.seed)
    print(f"[resume] {path} (step {progress.step})")
    return progress


def _train(cfg, stage: str, group, train: Split, held: Split | None, meta: ModelSidecar,
           tracker) -> None:
    role, sft = ROLE_OF[stage], getattr(cfg, stage)
    progress = _resume(cfg, group, train)
    start, cursor, skipped = progress.step, progress.cursor, progress.skipped_steps
    tracker.rewind(start, stage)  # steps after `start` are logged again: one history
    # train/ar/fve divides by the split's spread: a batch's own is biased low (metrics.fve)
    spread = gold_spread(train.vectors, meta.mse_scale) if role == "ar" else None
    bar = tqdm(range(start, sft.steps), initial=start, total=sft.steps, desc=stage, unit="step")
    for step in bar:
        step_started = time.perf_counter()
        rows = train.rows(cursor.next_indices(sft.batch_size))
        started = time.perf_counter()
        stats = group.train_step(rows, loss=f"{role}_sft")
        elapsed = time.perf_counter() - started
        skipped += stats["skipped"]
        done = step + 1
        metrics = {f"train/{role}/loss": stats["loss"], f"train/{role}/grad_norm": stats["grad_norm"],
                   f"train/{role}/lr": stats["lr"], f"perf/{role}/tokens_per_s": stats["tokens"] / elapsed,
                   "health/skipped_steps": skipped}
        if role == "ar":
            d = train.vectors.shape[1]  # the loss is a mean over d: d·loss = E‖n(ĥ) - n(h)‖²
            fit = stats["loss_stats"].get("fit_mse", stats["loss"])  # no loss_basis/contrast term
            metrics["train/ar/fve"] = fve_from_error(d * fit, spread=spread)
        if done == sft.steps or (sft.eval_every and done % sft.eval_every == 0):
            if role == "av":
                metrics.update(av_control(group, rows, seed=done, prefix="train"))
            metrics.update(held_out(group, role, held, rows=sft.eval_rows, world=group.world_size,
                                    mse_scale=meta.mse_scale, seed=cfg.run.seed))
        tracker.log(done, metrics, stage=stage)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if done == sft.steps or (sft.save_every and done % sft.save_every == 0):
            group.save(done, extra_files=lambda staging, done=done, skipped=skipped:
                       save_progress(staging, cursor, done, skipped))
        group.deadline.observe(time.perf_counter() - step_started)  # bounds the next calls
    bar.close()


def write_final(cfg, run_dir: Path, stage: str, group, meta: ModelSidecar,
                injection: InjectionSpec | None, spec) -> Path:
    """``<run>/<stage>/final``: the trained model as an HF directory (LoRA merged) + sidecar."""
    role, sft = ROLE_OF[stage], getattr(cfg, stage)
    run = RunPaths(run_dir)
    training = {"steps": sft.steps, "lr": sft.lr, "batch_size": sft.batch_size,
                "backend": cfg.learner.backend, "lora_rank": spec.model.lora.rank}
    if role == "ar" and sft.loss_basis != "raw":
        training["loss_basis"] = {"kind": sft.loss_basis, "eps": sft.loss_basis_eps,
                                  "weight": sft.loss_basis_weight}
    if role == "ar" and sft.contrast_weight > 0:
        training["contrast"] = {"weight": sft.contrast_weight, "tau": sft.contrast_tau,
                                "bank_rows": sft.contrast_bank_rows}
    return save_trained(cfg, group, role, run.init(role), meta, run.final(stage),
                        stage=stage, injection=injection, lora=spec.model.lora,
                        trained_on=str(run.split(stage)), training=training)


def ar_sft(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """AR-SFT: regress the activation from the teacher explanation."""
    run_sft(cfg, run_dir, "ar_sft", tracker)


def av_sft(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """AV-SFT: next-token loss on the teacher explanation with the activation injected."""
    run_sft(cfg, run_dir, "av_sft", tracker)
