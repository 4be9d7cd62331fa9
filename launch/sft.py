"""The supervised stages ``ar_sft`` and ``av_sft``: train the initial AR / AV on a learner group.

Each reads ``<run>/data/<stage>.parquet`` (+ ``eval.parquet`` for held-out metrics) and the
initial model ``<run>/init/<role>`` written by ``prepare``; checkpoints go to
``<run>/<stage>/step_NNNNNN/`` (resumed with ``run.resume=true``) and the trained model to
``<run>/<stage>/final/`` (an HF directory + ``nla_meta.yaml``), which RL and export read.

Metrics (``<run>/logs/metrics.jsonl``, and W&B as ``<stage>/…`` against ``<stage>/step`` when
enabled; :mod:`nla_rl.tracking`): ``train/<role>/{loss,grad_norm,lr}``,
``perf/<role>/tokens_per_s``, ``health/skipped_steps``; the AR adds ``train/ar/fve`` (from the
batch loss) and ``eval/ar/fve``; the AV adds the real-vs-shuffled control
``train/av/{shuffled_loss,shuffle_gap}`` and ``eval/av/{loss,shuffled_loss,shuffle_gap}``
(gap = shuffled − real loss; positive when the AV uses the injected activation).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nla_rl.config import RecipeConfig, SFTConfig
from nla_rl.errors import NLAError
from nla_rl.roundtrip import InjectionSpec
from nla_rl.sidecar import ModelSidecar, read_dataset_sidecar, read_model_sidecar

ROLE_OF = {"ar_sft": "ar", "av_sft": "av"}
CURSOR_FILE = "data_cursor.json"


class SFTStageError(NLAError):
    """An SFT stage's inputs are missing or do not belong together."""


@dataclass
class Split:
    """One data split: explanations and their activations [n, d] (fp32)."""

    explanations: list[str]
    vectors: np.ndarray

    def rows(self, indices) -> dict:
        return {"explanations": [self.explanations[i] for i in indices],
                "vectors": self.vectors[np.asarray(indices)]}


# ------------------------------------------------------------------------------------ inputs

def load_split(path: Path, *, init: ModelSidecar, stage: str) -> Split:
    """Rows with an explanation, after checking the file's sidecar matches the initial model."""
    from nla_rl.data.store import read_activations, read_rows

    if not path.is_file():
        raise SFTStageError(f"{stage}: {path} does not exist; the datagen stage writes it "
                            "(run.stages must include datagen before this stage)")
    meta = read_dataset_sidecar(path)
    for name, found, expected in (("extraction.base_model", meta.base_model, init.base_checkpoint),
                                  ("extraction.d_model", meta.d_model, init.d_model),
                                  ("extraction.layer_index", meta.layer_index,
                                   init.extraction_layer_index)):
        if found != expected:
            raise SFTStageError(
                f"{path}: {name} is {found!r} but the initial {init.role.upper()} was built for "
                f"{expected!r}; regenerate the data (datagen) for this model, or point run.dir at "
                "the run the data belongs to")
    texts = read_rows(path, columns=["explanation"])["explanation"].to_pylist()
    keep = [i for i, t in enumerate(texts) if t and t.strip()]
    if not keep:
        raise SFTStageError(f"{stage}: {path} has no rows with an explanation; the teacher "
                            "labelled nothing (check data.teacher)")
    vectors = read_activations(path)[np.asarray(keep)]
    return Split([texts[i] for i in keep], np.ascontiguousarray(vectors, dtype=np.float32))


def injection_for(meta: ModelSidecar, vectors: np.ndarray) -> InjectionSpec:
    """The sidecar's injection; a replace scale left null is chosen from the data (a little
    above the mean raw norm, the releases' rule, as the check stage does)."""
    scale = None
    if meta.injection_family == "replace":
        scale = meta.injection_scale or 1.1 * float(np.linalg.norm(vectors, axis=1).mean())
    return InjectionSpec(meta.injection_family, scale, meta.injection_add_layer,
                         meta.injection_add_coeff)


def learner_spec(cfg: RecipeConfig, stage: str, init_dir: Path, meta: ModelSidecar,
                 injection: InjectionSpec | None):
    """The LearnerSpec of a stage, from the recipe and the initial model's sidecar."""
    from actors.backends import OptimSpec
    from actors.learner import LearnerSpec
    from actors.learner_models import LoraSpec, ModelSpec

    sft: SFTConfig = getattr(cfg, stage)
    lc = cfg.learner
    role = ROLE_OF[stage]
    lora = LoraSpec(lc.lora_rank if role == "av" else 0, lc.lora_alpha, lc.lora_dropout,
                    lc.use_rslora, tuple(lc.lora_target_modules))
    depth = None
    if "{depth_pct}" in meta.av_template:
        from transformers import AutoConfig

        from nla_rl.templates import depth_percent
        layers = AutoConfig.from_pretrained(init_dir).num_hidden_layers
        depth = depth_percent(meta.extraction_layer_index, layers)
    model = ModelSpec(role=role, model_dir=str(init_dir), dtype=cfg.model.dtype,
                      trust_remote_code=cfg.model.trust_remote_code, lora=lora,
                      gradient_checkpointing=lc.gradient_checkpointing, injection=injection,
                      marker=meta.marker, av_template=meta.av_template,
                      av_prefill=cfg.templates.av_prefill, depth_pct=depth,
                      ar_template=meta.ar_template or "", mse_scale=meta.mse_scale)
    optim = OptimSpec(lr=sft.lr, weight_decay=sft.weight_decay, warmup_steps=sft.warmup_steps,
                      total_steps=sft.steps, schedule=sft.schedule, grad_clip=sft.grad_clip)
    ranks = lc.ranks_ar if role == "ar" else lc.ranks_av
    return LearnerSpec(model=model, optim=optim, backend=lc.backend, zero_stage=lc.zero_stage,
                       micro_batch_size=sft.micro_batch_size,
                       micro_batch_tokens=lc.micro_batch_tokens, seed=cfg.run.seed), ranks


# ---------------------------------------------------------------------------------- metrics

def batch_fve(loss: float, vectors: np.ndarray, mse_scale: float | None) -> float:
    """FVE of a batch from its mean normalised MSE: ``1 - d·loss / E‖n(h) - μ‖²`` (the loss is
    ``mean_b mean_d (n(ĥ) - n(h))²``, so ``d·loss = E‖n(ĥ) - n(h)‖²``)."""
    from nla_rl.metrics import fve_from_error

    gold = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    return fve_from_error(gold.shape[1] * loss, gold, mse_scale)  # NaN: no variance (as fve)


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
    init_dir = run_dir / "init" / role
    if not (init_dir / "nla_meta.yaml").is_file():
        raise SFTStageError(f"{stage}: no initial {role.upper()} at {init_dir}; the prepare stage "
                            "writes it (run.stages must include prepare first)")
    meta = read_model_sidecar(init_dir)
    train = load_split(run_dir / "data" / f"{stage}.parquet", init=meta, stage=stage)
    eval_path = run_dir / "data" / "eval.parquet"
    held = load_split(eval_path, init=meta, stage=stage) if eval_path.is_file() else None
    injection = injection_for(meta, train.vectors) if role == "av" else None
    spec, ranks = learner_spec(cfg, stage, init_dir, meta, injection)
    manager = CheckpointManager.for_recipe(run_dir / stage, cfg, stage, keep_last=sft.keep_last)
    connect_ray(num_cpus=recipe_cpus(cfg))
    group = LearnerGroup(spec, world_size=ranks, num_cpus_per_rank=cfg.learner.num_cpus_per_rank,
                         num_gpus_per_rank=cfg.learner.num_gpus_per_rank, name=stage,
                         checkpoints=manager, deadline=CallDeadline.from_run(cfg.run))
    try:
        _train(cfg, stage, group, train, held, meta, tracker)
        return write_final(cfg, run_dir, stage, group, meta, injection, spec)
    finally:
        group.shutdown()


def _resume(cfg, group, train: Split) -> tuple[int, object, float]:
    """(first step, data cursor, skipped steps so far): from the latest valid checkpoint when
    ``run.resume`` is on and there is one, else a fresh start."""
    import json

    from nla_rl.checkpoint import DataCursor, load_data_cursor

    fresh = DataCursor(len(train.explanations), cfg.run.seed)
    path = group.load() if cfg.run.resume else None
    if path is None:
        return 0, fresh, 0.0
    cursor = load_data_cursor(path / CURSOR_FILE, num_items=fresh.num_items, seed=fresh.seed)
    progress = json.loads((path / "progress.json").read_text())
    print(f"[resume] {path} (step {progress['step']})")
    return int(progress["step"]), cursor, float(progress["skipped_steps"])


def _train(cfg, stage: str, group, train: Split, held: Split | None, meta: ModelSidecar,
           tracker) -> None:
    from nla_rl.checkpoint import atomic_write_json, save_data_cursor

    role, sft = ROLE_OF[stage], getattr(cfg, stage)
    start, cursor, skipped = _resume(cfg, group, train)
    tracker.rewind(start, stage)  # steps after `start` are logged again: one history
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
            metrics["train/ar/fve"] = batch_fve(stats["loss"], rows["vectors"], meta.mse_scale)
        if done == sft.steps or (sft.eval_every and done % sft.eval_every == 0):
            if role == "av":
                metrics.update(av_control(group, rows, seed=done, prefix="train"))
            metrics.update(held_out(group, role, held, rows=sft.eval_rows, world=group.world_size,
                                    mse_scale=meta.mse_scale, seed=cfg.run.seed))
        tracker.log(done, metrics, stage=stage)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if done == sft.steps or (sft.save_every and done % sft.save_every == 0):
            def extra(staging: Path, cursor=cursor, done=done, skipped=skipped) -> None:
                save_data_cursor(cursor, staging / CURSOR_FILE)
                atomic_write_json(staging / "progress.json",
                                  {"step": done, "skipped_steps": skipped})
            group.save(done, extra_files=extra)
        group.deadline.observe(time.perf_counter() - step_started)  # bounds the next calls
    bar.close()


def write_final(cfg, run_dir: Path, stage: str, group, meta: ModelSidecar,
                injection: InjectionSpec | None, spec) -> Path:
    """``<run>/<stage>/final``: the trained model as an HF directory (LoRA merged) + sidecar."""
    role, sft = ROLE_OF[stage], getattr(cfg, stage)
    training = {"steps": sft.steps, "lr": sft.lr, "batch_size": sft.batch_size,
                "backend": cfg.learner.backend, "lora_rank": spec.model.lora.rank}
    return save_trained(cfg, group, role, run_dir / "init" / role, meta, run_dir / stage / "final",
                        stage=stage, injection=injection, lora=spec.model.lora,
                        trained_on=str(run_dir / "data" / f"{stage}.parquet"), training=training)


def save_trained(cfg, group, role: str, source_dir: Path, meta: ModelSidecar, out_dir: Path, *,
                 stage: str, injection: InjectionSpec | None, trained_on: str, training: dict,
                 lora=None, reward_basis: str | Path | None = None) -> Path:
    """The group's trained weights as an HF directory at ``out_dir`` (built on the config of
    ``source_dir``, LoRA merged) with a validated sidecar for ``stage``; written atomically. An AR
    trained against a reward basis carries it (the file, named in its sidecar)."""
    import dataclasses

    from transformers import AutoTokenizer

    from nla_rl.sidecar import validate_model_sidecar, write_model_sidecar

    state = group.full_state_dict()
    tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True,
                                              trust_remote_code=cfg.model.trust_remote_code)
    sidecar = dataclasses.replace(
        meta, stage=stage, created_at="",
        injection_scale=injection.scale if injection is not None else meta.injection_scale,
        trained_on=(trained_on,), parent_checkpoints=(str(source_dir),), training=training)
    if role == "ar":
        from nla_rl.ar_model import ActivationReconstructor
        from nla_rl.reward_basis import BASIS_FILE

        if reward_basis:
            sidecar = dataclasses.replace(sidecar, reward_basis=BASIS_FILE)

        def extra_files(d: Path) -> None:
            write_model_sidecar(d, sidecar)
            if reward_basis:
                shutil.copyfile(reward_basis, d / BASIS_FILE)

        model = ActivationReconstructor.from_pretrained(source_dir)
        model.load_state_dict(state)
        model.save_pretrained(out_dir, tokenizer, extra_files=extra_files)
    else:
        from launch.stages import _save_av
        from nla_rl.base_model import DTYPES, load_causal_lm

        model, _ = load_causal_lm(source_dir, dtype="float32",
                                  trust_remote_code=cfg.model.trust_remote_code)
        if lora is not None and lora.rank > 0:
            from actors.learner_models import apply_lora

            model = apply_lora(model, lora)
            model.load_state_dict(state)
            model = model.merge_and_unload()
        else:
            model.load_state_dict(state)
        _save_av(model.to(DTYPES[cfg.model.dtype]), tokenizer, sidecar, out_dir)
    validate_model_sidecar(read_model_sidecar(out_dir), tokenizer, model.config, role=role)
    print(f"[{stage}] wrote {out_dir}")
    return out_dir


def ar_sft(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """AR-SFT: regress the activation from the teacher explanation."""
    run_sft(cfg, run_dir, "ar_sft", tracker)


def av_sft(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """AV-SFT: next-token loss on the teacher explanation with the activation injected."""
    run_sft(cfg, run_dir, "av_sft", tracker)
