"""PNG plots of the eval report (matplotlib, Agg backend: no display needed).

Each function writes one file atomically and returns its path, or ``None`` when there is nothing
to plot (e.g. no training metrics logged yet).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from nla_rl.atomic import atomic_path  # noqa: E402

CURVE_GROUPS = ("train/", "reward/", "rollout/", "eval/")
MAX_CURVES = 12  # panels in the training-curves figure
_STYLE = {"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def training_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{metric: {stage: [(step, value), …]}}`` for the logged train/reward/rollout/eval
    metrics (finite values only; the eval stage's own rows are left out)."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        stage = str(row.get("stage", "run"))
        if stage == "eval" or not isinstance(row.get("step"), (int, float)):
            continue
        for key, value in row.items():
            if (key.startswith(CURVE_GROUPS) and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)):
                series[key][stage].append((float(row["step"]), float(value)))
    return {k: dict(v) for k, v in sorted(series.items())}


def _attempts(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """``points`` split where the step goes back (the stage was rerun in the same run dir)."""
    runs = [[points[0]]]
    for point in points[1:]:
        if point[0] <= runs[-1][-1][0]:
            runs.append([])
        runs[-1].append(point)
    return runs


def plot_training_curves(rows: list[dict], path: Path) -> Path | None:
    """One panel per metric (at most ``MAX_CURVES``, train/* first), one line per stage."""
    series = training_series(rows)
    if not series:
        return None
    names = sorted(series, key=lambda k: (CURVE_GROUPS.index(k.split("/")[0] + "/"), k))[:MAX_CURVES]
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for stage, points in series[name].items():
                runs = _attempts(points)
                for i, run in enumerate(runs):
                    steps, values = zip(*run)
                    latest = i == len(runs) - 1  # a rerun of the stage restarts its steps
                    ax.plot(steps, values, marker="." if len(run) < 30 else None,
                            alpha=1.0 if latest else 0.35,
                            label=stage if latest else f"{stage} (earlier attempt)" if i == 0 else None)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.legend(fontsize=8, title="stage", title_fontsize=8)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        fig.suptitle("Training curves (logs/metrics.jsonl)")
        fig.tight_layout()
        return _save(fig, path)


def plot_prefix_curve(curve: list[dict], controls: dict[str, float], path: Path) -> Path:
    """FVE against the number of explanation tokens the AR reads; controls as dashed lines."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot([p["tokens"] for p in curve], [p["fve"] for p in curve], marker="o",
                label="AR on the first n tokens")
        for (name, value), color in zip(controls.items(), ("tab:red", "tab:gray", "tab:green")):
            if value is not None and math.isfinite(value):
                ax.axhline(value, linestyle="--", color=color, label=f"{name} (full text)")
        ax.set_xlabel("explanation tokens read by the AR")
        ax.set_ylabel("FVE (paper definition)")
        ax.set_title("Prefix curve: how much of the explanation carries the activation")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path)


def plot_row_histograms(per_row: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Per-row normalised MSE and cosine of the model and of each control, overlaid."""
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
        for ax, metric, ref in ((axes[0], "mse", 2.0), (axes[1], "cosine", 0.0)):
            values = [v for rows in per_row.values() for v in rows[metric]]
            lo, hi = (min(values + [ref]), max(values + [ref])) if values else (0.0, 1.0)
            bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 30
            # Outlines, so identical distributions (an uninformed model = its controls) stay visible.
            for (name, rows), style in zip(per_row.items(), ("-", "--", ":")):
                ax.hist(rows[metric], bins=bins, histtype="step", linewidth=1.8, linestyle=style,
                        label=name)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.axvline(ref, color="black", linewidth=0.8, linestyle=":",
                       label="orthogonal" if metric == "mse" else None)
            ax.set_xlabel("per-row MSE (normalised; 2 = orthogonal)" if metric == "mse"
                          else "per-row cosine(ĥ, h)")
            ax.set_ylabel("rows")
            ax.legend(fontsize=8)
        fig.suptitle("Per-row round-trip error: model vs controls")
        fig.tight_layout()
        return _save(fig, path)
