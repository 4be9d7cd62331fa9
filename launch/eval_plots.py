"""PNG plots of the eval report (matplotlib, Agg backend: no display needed).

Each function writes one file atomically and returns its path, or ``None`` when there is nothing
to plot (e.g. no training metrics logged yet).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from nla_rl.atomic import atomic_path  # noqa: E402

_STYLE = {"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3}


@dataclass(frozen=True)
class Curve:
    """One panel of the training-curves figure: the metrics a person reads to judge a stage."""

    stage: str  # the panel's label: AR-SFT, AV-SFT or RL
    logged_as: str  # the ``stage`` field of the metrics.jsonl rows it reads
    title: str
    keys: tuple[str, ...]  # one line per key
    read: str  # what a healthy run shows (written into the eval report)


# In reading order; a line whose metric is absent or constantly 0 is left out, and a panel
# without lines with it (e.g. KL with rl.kl_beta=0, the toy metrics on real data).
CURVES = (
    Curve("AR-SFT", "ar_sft", "AR loss", ("train/ar/loss",), "falls, then flattens"),
    Curve("AR-SFT", "ar_sft", "AR FVE", ("eval/ar/fve", "train/ar/fve"),
          "held-out FVE rises and stays near the training FVE (a growing gap is overfitting); "
          "it is the reconstruction ceiling RL starts from"),
    Curve("AV-SFT", "av_sft", "AV loss", ("train/av/loss",), "falls, then flattens"),
    Curve("AV-SFT", "av_sft", "AV held-out loss: real vs shuffled vector",
          ("eval/av/loss", "eval/av/shuffled_loss"),
          "the real-vector loss drops below the shuffled one: the AV reads the activation"),
    Curve("RL", "rl", "reward (mean)", ("reward/mean",), "rises"),
    Curve("RL", "rl", "rollout FVE: live AR vs frozen AR-SFT", ("rollout/fve", "rollout/fve_frozen_ar"),
          "both rise with the reward; a live FVE climbing while the frozen AR's falls is the "
          "online AR being gamed (health/reward_up_truth_down flags it)"),
    Curve("RL", "rl", "diversity across activations", ("rollout/diversity/cross_group",
                                                      "rollout/diversity/distinct"),
          "stays high; a fall toward 1/prompts_per_step is a collapse to one explanation"),
    Curve("RL", "rl", "toy world: attribute recall / precision",
          ("rollout/toy/recall", "rollout/toy/precision"),
          "the ground truth: both rise; precision falling while recall rises is guessing"),
    Curve("RL", "rl", "KL", ("train/av/kl", "train/av/approx_kl"),
          "kl (to the reference) grows slowly and stays small; approx_kl (to the rollout "
          "policy) stays near 0"),
    Curve("RL", "rl", "response length (tokens)", ("rollout/mean_tokens",),
          "settles; steady growth to rl.max_new_tokens means explanations are being padded"),
    Curve("RL", "rl", "step time (s)", ("perf/step_s",),
          "flat after the first step; growth points at memory or engine trouble"),
)
COLUMNS = 3


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def training_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{metric: {stage: [(step, value), …]}}`` of every numeric metric logged by a training
    stage (finite values only; the check and eval stages' own rows are left out)."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        stage = str(row.get("stage", "run"))
        if stage in ("check", "eval") or not isinstance(row.get("step"), (int, float)):
            continue
        for key, value in row.items():
            if (key not in ("step", "time", "stage") and isinstance(value, (int, float))
                    and not isinstance(value, bool) and math.isfinite(value)):
                series[key][stage].append((float(row["step"]), float(value)))
    return {k: dict(v) for k, v in sorted(series.items())}


def chosen_curves(rows: list[dict]) -> list[tuple[Curve, dict[str, list[tuple[float, float]]]]]:
    """The panels of :data:`CURVES` that have something to show, each with its lines
    ``{metric: [(step, value), …]}`` (absent and constant-zero metrics dropped)."""
    series = training_series(rows)
    panels = []
    for curve in CURVES:
        lines = {key: series[key][curve.logged_as] for key in curve.keys
                 if curve.logged_as in series.get(key, {})}
        lines = {k: v for k, v in lines.items() if any(value != 0.0 for _, value in v)}
        if lines:
            panels.append((curve, lines))
    return panels


def _attempts(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """``points`` split where the step goes back (the stage was rerun in the same run dir)."""
    runs = [[points[0]]]
    for point in points[1:]:
        if point[0] <= runs[-1][-1][0]:
            runs.append([])
        runs[-1].append(point)
    return runs


def _grid(panels) -> list[list]:
    """Figure rows: each stage starts a new row of at most :data:`COLUMNS` panels."""
    rows: list[list] = []
    for i, panel in enumerate(panels):
        if i == 0 or panel[0].stage != panels[i - 1][0].stage or len(rows[-1]) == COLUMNS:
            rows.append([])
        rows[-1].append(panel)
    return rows


def _labels(keys) -> list[str]:
    """The keys without the path segments they share (``eval/ar/fve``, ``train/ar/fve`` stay
    whole; ``rollout/toy/recall``, ``rollout/toy/precision`` become recall, precision)."""
    parts = [k.split("/") for k in keys]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return ["/".join(p[shared:]) for p in parts]


def _draw(ax, curve: Curve, lines: dict) -> None:
    for name, points in zip(_labels(lines), lines.values()):
        runs = _attempts(points)
        for i, run in enumerate(runs):
            steps, values = zip(*run)
            latest = i == len(runs) - 1  # a rerun of the stage restarts its steps
            ax.plot(steps, values, marker="." if len(run) < 30 else None,
                    alpha=1.0 if latest else 0.35,
                    label=name if latest else f"{name} (earlier attempt)" if i == 0 else None)
    ax.set_title(f"{curve.stage}: {curve.title}", fontsize=10)
    ax.set_xlabel("step")
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=8)


def plot_training_curves(rows: list[dict], path: Path) -> Path | None:
    """The curves of :data:`CURVES` that were logged, one row of panels per stage."""
    grid = _grid(chosen_curves(rows))
    if not grid:
        return None
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(len(grid), COLUMNS, figsize=(4.2 * COLUMNS, 3.0 * len(grid)),
                                 squeeze=False)
        for ax_row, panels in zip(axes, grid):
            for ax, (curve, lines) in zip(ax_row, panels):
                _draw(ax, curve, lines)
            for ax in ax_row[len(panels):]:
                ax.set_visible(False)
        fig.suptitle("Training curves (logs/metrics.jsonl)")
        fig.tight_layout()
        return _save(fig, path)


def curve_guide(rows: list[dict]) -> list[dict]:
    """What the eval report says about the training-curves figure: each panel drawn, its
    metrics and what to look for."""
    return [{"stage": c.stage, "title": c.title, "metrics": list(lines), "read": c.read}
            for c, lines in chosen_curves(rows)]


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
