"""``nla-rl ablate RECIPE --from RUN`` — RL variants from one SFT pair, compared on truth.

Every variant starts from the same run's data and SFT pair (``base``, ``init``, ``data``,
``ar_sft``, ``av_sft`` are linked, never copied or retrained), runs the ``rl``, ``export`` and
``eval`` stages into ``RUN/ablate/<variant>-s<seed>/`` with its overrides and the RL seed
(``rl.seed``), and is scored by the eval stage on the same held-out rows. The table
(``RUN/ablate/table.md`` and ``table.json``) reports, per variant, the mean over seeds (± the
spread when there are several) of: attribute precision and recall and optional-slot recall (toy
world), top-1 among the hard negatives, FVE, cross-group diversity of the last RL steps'
rollouts, and the RL wall time. Run again after an interruption, it reuses every variant run
that finished with the same resolved recipe and redoes the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from launch.common import RunPaths
from nla_rl.atomic import atomic_path, atomic_write_json
from nla_rl.config import load_recipe
from nla_rl.errors import ConfigError

# name → overrides. The recipe itself is "recipe"; the others change one thing against it.
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "ar_frozen": ["rl.online_ar=false"],
    "ar_online_no_ema": ["rl.online_ar=true", "rl.ar_ema_decay=0.0"],
    "ar_online_ema": ["rl.online_ar=true", "rl.ar_ema_decay=0.9"],
    "negatives_off": ["negatives.enabled=false"],
    "negatives_max": ["negatives.enabled=true", "negatives.combine=max"],
    "negatives_infonce": ["negatives.enabled=true", "negatives.combine=infonce"],
    "basis_raw": ["rl.reward_basis=raw"],
    "basis_centre": ["rl.reward_basis=centre"],
    "basis_standardize": ["rl.reward_basis=standardize"],
    "basis_whiten": ["rl.reward_basis=whiten"],
    "async_1": ["rl.async_level=1"],  # rollouts one policy version old, generated ahead
}
SHARED = ("base", "init", "data", "ar_sft", "av_sft")  # what every variant reads, linked
COLUMNS = (("toy_precision", "attr. precision"), ("toy_recall", "attr. recall"),
           ("toy_slot_recall", "slot recall"), ("top1", "top-1 vs negatives"),
           ("top1_centred", "top-1, centred"), ("fve", "FVE"),
           ("diversity", "cross-group diversity"), ("rl_s", "RL wall s"))
RUN_COLUMNS = ("diversity", "rl_s")  # read from the variant's logs; the others from its report
TAIL_STEPS = 10  # diversity: mean over the last RL steps


def link_shared(source: Path, target: Path) -> None:
    """``target`` holds symlinks to the source run's data and SFT pair (its own rl/eval dirs)."""
    missing = [name for name in SHARED if not (source / name).exists()]
    if missing:
        raise ConfigError(f"ablate --from {source}: missing {', '.join(missing)}; run the recipe "
                          "through av_sft first (run.stages=[prepare,datagen,ar_sft,av_sft])")
    target.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = target / name
        if not link.exists():
            os.symlink((source / name).resolve(), link)


def run_variant(recipe: str, source: Path, name: str, seed: int, overrides: list[str],
                *, steps: int | None) -> dict:
    """Run one variant (rl → export → eval) and return its row of the table."""
    from launch.train import run

    run_dir = source / "ablate" / f"{name}-s{seed}"
    link_shared(source, run_dir)
    extra = [f"rl.steps={steps}"] if steps is not None else []
    variant = [*overrides, *VARIANTS[name], *extra, f"rl.seed={seed}", f"run.dir={run_dir}",
               "run.stages=[rl,export,eval]", "run.resume=false"]
    started = time.perf_counter()
    if finished_earlier(recipe, variant, run_dir):
        print(f"[ablate] {name} seed {seed}: evaluated earlier with the same recipe, reused")
    else:
        run(recipe, variant)
    wall = time.perf_counter() - started
    report = json.loads((RunPaths(run_dir).eval / "report.json").read_text())
    measured = {k: report["metrics"].get(k) for k, _ in COLUMNS if k not in RUN_COLUMNS}
    return {"variant": name, "seed": seed, **measured,
            "diversity": _tail_mean(RunPaths(run_dir).logs,
                                    "rollout/diversity/cross_group"),
            "rl_s": _stage_seconds(run_dir, wall)}


def finished_earlier(recipe: str, overrides: list[str], run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds this variant's finished run: its stored recipe equals
    the one these overrides resolve to, and its eval report was written after it. An
    interrupted ablation, rerun, then redoes only what is missing (or was run differently)."""
    import yaml

    from nla_rl.config import redact

    paths = RunPaths(run_dir)
    stored, report = paths.recipe, paths.eval / "report.json"
    if not (stored.is_file() and report.is_file()
            and report.stat().st_mtime_ns >= stored.stat().st_mtime_ns):
        return False
    wanted = yaml.safe_load(yaml.safe_dump(redact(load_recipe(recipe, overrides)), sort_keys=False))
    return yaml.safe_load(stored.read_text(encoding="utf-8")) == wanted


def _tail_mean(path: Path, key: str) -> float | None:
    values = [row[key] for row in map(json.loads, path.read_text().splitlines())
              if key in row and row.get("stage") == "rl"]
    values = values[-TAIL_STEPS:]
    return sum(values) / len(values) if values else None


def _stage_seconds(run_dir: Path, wall: float) -> float:
    """The RL stage's wall time from its logged step times, or the whole variant's."""
    path = RunPaths(run_dir).logs
    steps = [row["perf/step_s"] for row in map(json.loads, path.read_text().splitlines())
             if "perf/step_s" in row]
    return sum(steps) if steps else wall


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant (first-seen order): each column's mean over seeds and its spread."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary = {"variant": name, "seeds": [r["seed"] for r in mine]}
        for key, _ in COLUMNS:
            values = [r[key] for r in mine if r.get(key) is not None and math.isfinite(r[key])]
            summary[key] = sum(values) / len(values) if values else None
            summary[key + "_spread"] = (max(values) - min(values)) if len(values) > 1 else None
        out.append(summary)
    return out


def render_table(summary: list[dict]) -> str:
    """The markdown table: mean (± half the max−min spread over seeds)."""
    def cell(s, key):
        value, spread = s[key], s[key + "_spread"]
        if value is None:
            return "n/a"
        text = f"{value:.1f}" if key == "rl_s" else f"{value:.3f}"
        return text if spread is None else f"{text} ± {spread / 2:.{1 if key == 'rl_s' else 3}f}"
    lines = ["| variant | seeds | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for s in summary:
        lines.append(f"| {s['variant']} | {','.join(map(str, s['seeds']))} | "
                     + " | ".join(cell(s, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def ablate(recipe: str, source: Path, variants: list[str], seeds: list[int],
           overrides: list[str], *, steps: int | None = None) -> list[dict]:
    """Run every (variant, seed); write ``ablate/table.{md,json}``; return the summary."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"ablate: unknown variant(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(VARIANTS)}")
    load_recipe(recipe, overrides)  # a bad recipe or override fails here, before any run
    rows = []
    for name in variants:
        for seed in seeds:
            print(f"[ablate] {name} seed {seed}")
            rows.append(run_variant(recipe, source, name, seed, overrides, steps=steps))
    summary = summarise(rows)
    out = source / "ablate"
    atomic_write_json(out / "table.json", {"rows": rows, "summary": summary}, indent=1)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(render_table(summary))
    return summary


def add_ablate_command(sub) -> None:
    parser = sub.add_parser("ablate", help="RL variants from one SFT pair → a truth table")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    parser.add_argument("--from", dest="source", required=True,
                        help="run directory holding the data and SFT pair (after av_sft)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1", help="RL seeds (rl.seed), comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="override rl.steps")
    parser.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args: argparse.Namespace) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    summary = ablate(args.recipe, Path(args.source), [v for v in args.variants.split(",") if v],
                     seeds, args.overrides, steps=args.steps)
    print(render_table(summary))
    return 0
