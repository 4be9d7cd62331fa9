"""Pipeline stages. Each reads only what earlier stages wrote to the run directory, so any stage
can be rerun alone."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from launch.common import RunPaths, injection_of, save_av
from launch.datagen import datagen
from launch.eval import eval_stage
from launch.export import export
from launch.rl import rl
from launch.sft import ar_sft, av_sft
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.atomic import atomic_write_json
from nla_rl.base_model import DTYPES, check_context, load_causal_lm, resolve_base_model
from nla_rl.config import RecipeConfig
from nla_rl.errors import ConfigError
from nla_rl.injection import CENTRE_FILE
from nla_rl.rewards import mse_scale_for
from nla_rl.templates import av_prompt_ids, depth_pct_for
from nla_rl.data.store import read_activations, read_rows
from nla_rl.data.toyworld import score_explanations
from nla_rl.roundtrip import round_trip
from nla_rl.sidecar import (ModelSidecar, make_token_meta, read_model_sidecar, validate_model_sidecar,
                            write_model_sidecar)


CHECK_ROWS = 32  # held-out activations the check stage round-trips


def prepare(cfg: RecipeConfig, run_dir: Path, tracker=None) -> None:
    """Base model → marker tokens → initial AV (the base) and AR (blocks 0..K + identity head),
    each an HF directory with a validated ``nla_meta.yaml`` (it logs no metrics)."""
    run = RunPaths(run_dir)
    base_dir = resolve_base_model(cfg.model.base, run_dir, seed=cfg.run.seed, toyworld=cfg.toyworld)
    model, tokenizer = load_causal_lm(base_dir, dtype=cfg.model.dtype,
                                      trust_remote_code=cfg.model.trust_remote_code)
    n_layers = model.config.num_hidden_layers
    if cfg.model.layer_index >= n_layers:
        raise ConfigError(f"model.layer_index: must be < {n_layers} (blocks of {base_dir}), "
                          f"found {cfg.model.layer_index}")
    tokens = make_token_meta(tokenizer, cfg.templates.av, cfg.templates.ar, cfg.injection.marker,
                             depth_pct=depth_pct_for(cfg.templates.av, cfg.model.layer_index, n_layers))
    common = dict(
        stage="init", base_checkpoint=cfg.model.base, d_model=model.config.hidden_size,
        extraction_layer_index=cfg.model.layer_index, mse_scale=mse_scale_for(model.config.hidden_size),
        tokens=tokens, av_template=cfg.templates.av, ar_template=cfg.templates.ar,
        injection_family=cfg.injection.family, injection_add_layer=cfg.injection.add_layer,
        injection_add_coeff=cfg.injection.add_coeff,
    )
    av_meta = ModelSidecar(role="av", injection_scale=cfg.injection.scale,
                           injection_centre=CENTRE_FILE if cfg.injection.centre else None, **common)
    ar_meta = ModelSidecar(role="ar", injection_scale=None, **common)

    save_av(model, tokenizer, av_meta, run.init("av"))
    ar = ActivationReconstructor.from_base(base_dir, cfg.model.layer_index, dtype=DTYPES[cfg.model.dtype],
                                           trust_remote_code=cfg.model.trust_remote_code)
    ar.save_pretrained(run.init("ar"), tokenizer,
                       extra_files=lambda d: write_model_sidecar(d, ar_meta))
    # Read back what was written: a checkpoint is only done once it validates like a user's would.
    validate_model_sidecar(read_model_sidecar(run.init("av")), tokenizer, model.config, role="av")
    validate_model_sidecar(read_model_sidecar(run.init("ar")), tokenizer, ar.config, role="ar")
    print(f"[prepare] base={base_dir} K={cfg.model.layer_index} d={model.config.hidden_size} "
          f"marker={tokens.char!r} id={tokens.token_id} neighbours=({tokens.left_id}, {tokens.right_id})")


def check(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """Round trip ``ĥ = AR(AV(h))`` on held-out activations with the initial checkpoints.

    Verifies, before any training is paid for, that every vector is injected exactly once and that
    rewards and metrics are finite; records the untrained baseline (and, in the toy world, the
    attribute recall/precision of the explanations).
    """
    run = RunPaths(run_dir)
    av_meta = read_model_sidecar(run.init("av"))
    av, av_tok = load_causal_lm(run.init("av"), dtype=cfg.model.dtype,
                                trust_remote_code=cfg.model.trust_remote_code)
    ar = ActivationReconstructor.from_pretrained(run.init("ar"), dtype=DTYPES[cfg.model.dtype],
                                                 trust_remote_code=cfg.model.trust_remote_code)
    ar_tok = _ar_tokenizer(run.init("ar"), cfg)
    eval_path = run.split("eval")
    if not eval_path.exists():
        raise ConfigError(f"the check stage reads {eval_path}, which the datagen stage writes; "
                          "add datagen to run.stages (before check)")
    rows = read_rows(eval_path).slice(0, CHECK_ROWS)
    vectors = torch.from_numpy(read_activations(eval_path)[:rows.num_rows].copy())
    # A replace scale left null is the one datagen recorded: the scale training will use.
    injection = injection_of(av_meta, run_dir)
    depth = depth_pct_for(av_meta.av_template, av_meta.extraction_layer_index,
                          av.config.num_hidden_layers)
    prompt = av_prompt_ids(av_tok, av_meta.av_template, av_meta.tokens.char, depth_pct=depth,
                           prefill=cfg.templates.av_prefill)
    check_context(av.config, len(prompt), cfg.rl.max_new_tokens, "rl.max_new_tokens")
    started = time.perf_counter()
    result = round_trip(av, av_tok, ar, ar_tok, vectors, marker=av_meta.tokens.marker,
                        av_template=av_meta.av_template, ar_template=av_meta.ar_template,
                        injection=injection, mse_scale=av_meta.mse_scale,
                        max_new_tokens=cfg.rl.max_new_tokens, reward=cfg.rl.reward,
                        prefill=cfg.templates.av_prefill, depth_pct=depth)
    metrics = {**result.metrics, "perf/check_seconds": time.perf_counter() - started}
    if "attributes" in rows.column_names:
        toy = score_explanations(result.explanations, rows["attributes"].to_pylist())
        metrics.update({"toy/recall": toy.recall, "toy/precision": toy.precision})
    _assert_healthy(result, len(vectors))
    tracker.log(0, metrics, stage="check")
    atomic_write_json(run.eval / "check.json", {
        "metrics": metrics, "injection_scale": injection.scale,
        "samples": [{"doc_id": d, "position": p, "explanation": e, "reward": float(r)}
                    for d, p, e, r in zip(rows["doc_id"].to_pylist()[:8], rows["position"].to_pylist()[:8],
                                          result.texts[:8], result.rewards[:8])],
    })
    print("[check] " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


def _assert_healthy(result, n_vectors: int) -> None:
    if result.injections_applied != n_vectors:
        raise RuntimeError(f"injection broken: {result.injections_applied} rows injected for "
                           f"{n_vectors} vectors; check the marker tokens in the sidecar")
    bad = [k for k, v in result.metrics.items() if not math.isfinite(v)]
    if bad or not torch.isfinite(result.rewards).all():
        raise RuntimeError(f"non-finite round-trip numbers: {bad or 'rewards'}")


def _ar_tokenizer(ar_dir: Path, cfg: RecipeConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ar_dir, local_files_only=True,
                                         trust_remote_code=cfg.model.trust_remote_code)


# Each stage is called as stage(cfg, run_dir, tracker): the run's one nla_rl.tracking.Tracker.
STAGES = {"prepare": prepare, "datagen": datagen, "check": check, "ar_sft": ar_sft,
          "av_sft": av_sft, "rl": rl, "eval": eval_stage, "export": export}
PLANNED: dict[str, str] = {}  # stages named in the recipe schema but not built yet
