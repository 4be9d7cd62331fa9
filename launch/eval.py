"""The ``eval`` stage and ``nla-rl eval RUN_DIR``: score an AV/AR pair on the held-out split.

Reads ``<run>/data/eval.parquet`` (first N rows) and, by default, the most trained pair present in
the run (``export`` → ``rl/final`` → ``{av,ar}_sft/final`` → ``init``; the report names it).
Writes ``<run>/eval/report.json``, ``report.md`` and PNG plots, and logs ``eval/*`` metrics.

Two controls, both reported, say what the numbers would be without information about the row:

* ``shuffled``: every row's explanation is generated from *another* row's vector (a derangement)
  and scored against its own gold — the AV works normally but says nothing about this row;
* ``no_injection``: the same prompts with the injection disabled (the marker keeps its plain
  embedding), so every row gets the same, vector-free explanation.

Earlier pairs of the run (``eval.compare``, default the SFT pair) are scored on the same rows, so
the report says what the later stages added (``baselines``; ``eval/baseline/<label>/*``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from launch.common import RunPaths
from nla_rl.atomic import atomic_write_json, atomic_write_text, check_writable_dir
from nla_rl.config import EvalConfig, RecipeConfig, load_recipe
from nla_rl.data.store import read_activations, read_rows
from nla_rl.errors import NLAError
from nla_rl.evaluation import (derangement, eval_negatives, prefix_curve, round_trip_metrics,
                               toy_metrics)
from nla_rl.inference import NLA
from nla_rl.metrics_log import MetricsLog
from nla_rl.sidecar import MODEL_SIDECAR_NAME
from nla_rl.tracking import check_metric_names

# (label, AV dir, AR dir), most trained first.
CANDIDATES = (("export", "export/av", "export/ar"), ("rl", "rl/final/av", "rl/final/ar"),
              ("sft", "av_sft/final", "ar_sft/final"), ("init", "init/av", "init/ar"))
CONTROLS = ("shuffled", "no_injection")


class EvalError(NLAError):
    """The eval stage cannot run as asked (no models, no eval split, bad arguments)."""


def pick_models(run_dir: Path) -> tuple[str, Path, Path]:
    """``(label, av_dir, ar_dir)`` of the most trained pair of ``run_dir`` with both sidecars."""
    for label, av, ar in CANDIDATES:
        av_dir, ar_dir = run_dir / av, run_dir / ar
        if (av_dir / MODEL_SIDECAR_NAME).is_file() and (ar_dir / MODEL_SIDECAR_NAME).is_file():
            return label, av_dir, ar_dir
    looked = ", ".join(f"{av} + {ar}" for _, av, ar in CANDIDATES)
    raise EvalError(f"{run_dir}: no AV/AR pair found (looked for {looked}); run the prepare stage "
                    "first, or pass --av and --ar")


def _run_recipe(run_dir: Path) -> RecipeConfig | None:
    path = RunPaths(run_dir).recipe
    return load_recipe(path) if path.is_file() else None


def _load_nla(av_dir: Path, ar_dir: Path, cfg: RecipeConfig | None) -> NLA:
    """A pair as the run's recipe serves it (dtype, prefill, trust_remote_code)."""
    if cfg is None:
        return NLA.from_pretrained(av_dir, ar_dir)
    return NLA.from_pretrained(av_dir, ar_dir, dtype=cfg.model.dtype, prefill=cfg.templates.av_prefill,
                               trust_remote_code=cfg.model.trust_remote_code)


def _finite_or_none(obj):
    """JSON-safe copy of ``obj``: NaN/inf → null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _score(nla: NLA, gold: torch.Tensor, generation, negatives, attributes) -> tuple[dict, dict]:
    """Metrics and per-row numbers of one generation scored against ``gold``."""
    result = nla.score_generation(gold, generation)
    metrics = round_trip_metrics(result.predictions, gold, mse_scale=nla.mse_scale,
                                 texts=result.texts, explanations=result.explanations,
                                 negatives=negatives)
    metrics["reward_mse"] = float(result.mse.mean())  # in the AR's reward basis (raw: = mse)
    if attributes is not None:
        metrics.update(toy_metrics(result.explanations, attributes))
    return metrics, {"mse": result.mse.tolist(), "cosine": result.cosine.tolist()}


def evaluate(run_dir: str | Path, *, av: str | Path | None = None, ar: str | Path | None = None,
             rows: int | None = None, max_new_tokens: int | None = None,
             batch_size: int | None = None, compare: tuple[str, ...] | None = None,
             cfg: RecipeConfig | None = None, tracker=None) -> dict:
    """Evaluate a pair on ``<run>/data/eval.parquet``; write the report; return its dict. Unset
    settings come from the run's recipe (``eval.*``), else the defaults. The ``eval/*`` metrics
    go to ``tracker`` (the pipeline's, so W&B too) or, without one, to ``logs/metrics.jsonl``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"{run_dir}: no such run directory" + (" (it is a file)" if run_dir.exists()
                                                                else ""))
    for sub in ("eval", "logs"):  # checked before minutes of scoring, not when writing the plot
        check_writable_dir(run_dir / sub, f"eval output directory {sub}/ of")
    cfg = cfg or _run_recipe(run_dir)
    settings = cfg.eval if cfg else EvalConfig()
    rows = rows if rows is not None else settings.rows
    batch_size = batch_size if batch_size is not None else settings.batch_size
    compare = compare if compare is not None else settings.compare
    max_new_tokens = (max_new_tokens or settings.max_new_tokens
                      or (cfg.rl.max_new_tokens if cfg else 128))
    if (av is None) != (ar is None):
        raise EvalError("pass both --av and --ar, or neither (the run's most trained pair)")
    label, av_dir, ar_dir = ("given", Path(av), Path(ar)) if av is not None else pick_models(run_dir)
    eval_path = RunPaths(run_dir).split("eval")
    if not eval_path.is_file():
        raise EvalError(f"{eval_path} does not exist: the datagen stage writes it")
    if rows < 2:
        raise EvalError(f"rows: expected ≥ 2 (FVE needs a variance), found {rows}")
    table = read_rows(eval_path).slice(0, rows)
    gold = torch.from_numpy(read_activations(eval_path)[:table.num_rows].copy())
    doc_ids = np.asarray(table["doc_id"].to_pylist())
    attributes = table["attributes"].to_pylist() if "attributes" in table.column_names else None
    started = time.perf_counter()
    nla = _load_nla(av_dir, ar_dir, cfg)
    negatives = eval_negatives(gold.numpy(), doc_ids)
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    generation = nla.generate(gold, **gen)
    if generation.injections_applied != len(gold):
        raise EvalError(f"injection broken: {generation.injections_applied} rows injected for "
                        f"{len(gold)} vectors; check the AV's marker tokens (nla-rl sidecar check)")
    metrics, per_row = _score(nla, gold, generation, negatives, attributes)
    perm = torch.from_numpy(derangement(len(gold), seed=0))
    control_gens = {"shuffled": nla.generate(gold[perm], **gen),
                    "no_injection": nla.generate(gold, inject=False, **gen)}
    controls, control_rows = {}, {}
    for name, control_gen in control_gens.items():
        controls[name], control_rows[name] = _score(nla, gold, control_gen, negatives, attributes)
    baselines = _baselines(run_dir, compare, nla, gold, negatives, attributes, cfg, gen)
    curve = prefix_curve(nla.reconstruct, nla.ar_tokenizer, generation.explanations, gold,
                         mse_scale=nla.mse_scale)
    report = {
        "models": {"label": label, "av": str(av_dir), "ar": str(ar_dir),
                   "av_stage": nla.av_meta.stage, "ar_stage": nla.ar_meta.stage},
        "data": {"split": str(eval_path), "rows": len(gold), "documents": int(len(set(doc_ids))),
                 "hard_negatives_per_row": 0 if negatives is None else int(negatives.shape[1])},
        "settings": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                     "injection_family": nla.injection.family,
                     "injection_scale": generation.injection_scale,
                     "injection_centred": nla.injection.centre is not None,
                     "injection_whitened": nla.injection.whitened, "mse_scale": nla.mse_scale,
                     "reward_basis": nla.reward_basis.kind if nla.reward_basis else "raw",
                     "prefill": nla.prefill, "depth_pct": nla.depth_pct},
        "metrics": metrics, "controls": controls, "baselines": baselines, "prefix_curve": curve,
        "seconds": time.perf_counter() - started,
        "samples": [{"doc_id": int(doc_ids[i]), "explanation": generation.explanations[i],
                     "mse": per_row["mse"][i], "cosine": per_row["cosine"][i],
                     "shuffled_control": control_gens["shuffled"].explanations[i],
                     "no_injection_control": control_gens["no_injection"].explanations[i]}
                    for i in range(min(8, len(gold)))],
    }
    out_dir = RunPaths(run_dir).eval
    report["plots"], report["training_curves"] = _plots(run_dir, out_dir, curve, controls, metrics,
                                                        {"model": per_row, **control_rows})
    _write_report(out_dir, report)
    _log(run_dir, metrics, controls, baselines, tracker)
    return report


def _baselines(run_dir: Path, labels, evaluated: NLA, gold, negatives, attributes, cfg,
               gen: dict) -> dict:
    """``{label: {"av", "ar", "metrics"}}`` of each earlier pair in ``labels`` that the run has
    and that is not the evaluated pair itself (same stages in both sidecars)."""
    from nla_rl.sidecar import read_model_sidecar

    pairs = {label: (run_dir / av, run_dir / ar) for label, av, ar in CANDIDATES}
    out = {}
    for label in labels:
        av_dir, ar_dir = pairs[label]
        if not ((av_dir / MODEL_SIDECAR_NAME).is_file() and (ar_dir / MODEL_SIDECAR_NAME).is_file()):
            continue
        stages = (read_model_sidecar(av_dir).stage, read_model_sidecar(ar_dir).stage)
        if stages == (evaluated.av_meta.stage, evaluated.ar_meta.stage):
            continue
        nla = _load_nla(av_dir, ar_dir, cfg)
        metrics, _ = _score(nla, gold, nla.generate(gold, **gen), negatives, attributes)
        out[label] = {"av": str(av_dir), "ar": str(ar_dir), "metrics": metrics}
    return out


def _plots(run_dir, out_dir, curve, controls, metrics, per_row) -> tuple[list[str], list[dict]]:
    """The plots' file names, and what the training-curves figure shows (for the report)."""
    # matplotlib is imported here, not at module level: every stage imports this module.
    from launch.eval_plots import (curve_guide, plot_prefix_curve, plot_row_histograms,
                                   plot_training_curves)

    logged = MetricsLog(RunPaths(run_dir).logs).read()
    paths = [plot_training_curves(logged, out_dir / "training_curves.png"),
             plot_prefix_curve(curve, {"model": metrics["fve"],
                                       **{f"control: {k}": v["fve"] for k, v in controls.items()}},
                               out_dir / "prefix_curve.png"),
             plot_row_histograms(per_row, out_dir / "row_errors.png")]
    return [p.name for p in paths if p is not None], curve_guide(logged)


def _log(run_dir: Path, metrics: dict, controls: dict, baselines: dict, tracker) -> None:
    flat = {f"eval/{k}": v for k, v in metrics.items()}
    flat.update({f"eval/control/{c}/{k}": v for c, m in controls.items() for k, v in m.items()})
    flat.update({f"eval/baseline/{b}/{k}": v for b, entry in baselines.items()
                 for k, v in entry["metrics"].items()})
    if tracker is not None:
        tracker.log(0, flat, stage="eval")
        return
    check_metric_names(flat)
    MetricsLog(RunPaths(run_dir).logs).log(0, flat, stage="eval")


def _write_report(out_dir: Path, report: dict) -> None:
    from launch.eval_report import render_markdown

    atomic_write_json(out_dir / "report.json", _finite_or_none(report))
    atomic_write_text(out_dir / "report.md", render_markdown(report))


def eval_stage(cfg: RecipeConfig, run_dir: Path, tracker) -> None:
    """Pipeline stage: evaluate the run's most trained pair (see the module docstring)."""
    report = evaluate(run_dir, cfg=cfg, tracker=tracker)
    m = report["metrics"]
    for label, entry in report["baselines"].items():
        b = entry["metrics"]
        print(f"[eval] {label} (same rows): fve={b['fve']:.4g} cosine={b['cosine']:.4g} "
              f"gap={b['gap']:.4g} top1={b['top1']:.4g}")
    print(f"[eval] {report['models']['label']}: fve={m['fve']:.4g} cosine={m['cosine']:.4g} "
          f"gap={m['gap']:.4g} top1={m['top1']:.4g} "
          f"(shuffled fve={report['controls']['shuffled']['fve']:.4g}, "
          f"no-injection fve={report['controls']['no_injection']['fve']:.4g}) "
          f"→ {run_dir / 'eval' / 'report.md'}")
