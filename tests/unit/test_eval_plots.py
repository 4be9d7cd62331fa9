"""Which training curves the eval report plots, from a constructed logs/metrics.jsonl."""

import json
import math

from launch.eval_plots import chosen_curves, curve_guide, plot_training_curves
from launch.eval_report import _curves_section
from nla_rl.metrics_log import MetricsLog


def _metrics_jsonl(path):
    log = MetricsLog(path)
    log.log(0, {"toy/recall": 0.3, "fve": 0.1}, stage="check")
    for step in range(1, 11):
        log.log(step, {"train/ar/loss": 1.0 / step, "train/ar/lr": 3e-4, "train/ar/fve": 0.05 * step,
                       "health/skipped_steps": 0.0}, stage="ar_sft")
        if step % 5 == 0:
            log.log(step, {"eval/ar/fve": 0.04 * step}, stage="ar_sft")
        log.log(step, {"train/av/loss": 2.0 / step, "eval/av/loss": 2.0 / step,
                       "eval/av/shuffled_loss": 2.5 / step}, stage="av_sft")
    for step in range(1, 9):
        log.log(step, {"reward/mean": -1.0 + 0.1 * step, "reward/gap": math.nan,
                       "rollout/fve": 0.2 + 0.01 * step, "rollout/mean_tokens": 20.0 + step,
                       "rollout/toy/recall": 0.5, "rollout/toy/precision": 0.6 + 0.01 * step,
                       "train/av/approx_kl": 0.0, "train/av/clip_frac": 0.0,  # on-policy: flat 0
                       "train/av/is_capped_frac": 0.0, "perf/step_s": 3.0 + 0.1 * step},
                stage="rl")
    log.log(1, {"eval/fve": 0.4}, stage="eval")
    return log.read()


def test_the_curves_people_read_grouped_by_stage(tmp_path):
    panels = chosen_curves(_metrics_jsonl(tmp_path / "metrics.jsonl"))
    assert [(c.stage, c.title) for c, _ in panels] == [
        ("AR-SFT", "AR loss"), ("AR-SFT", "AR FVE"), ("AV-SFT", "AV loss"),
        ("AV-SFT", "AV held-out loss: real vs shuffled vector"), ("RL", "reward (mean)"),
        ("RL", "rollout FVE: live AR vs frozen AR-SFT"),
        ("RL", "toy world: attribute recall / precision"),
        ("RL", "response length (tokens)"), ("RL", "step time (s)")]  # KL: only a flat 0 logged
    lines = {c.title: l for c, l in panels}
    assert list(lines["AR FVE"]) == ["eval/ar/fve", "train/ar/fve"]
    assert lines["AR FVE"]["eval/ar/fve"] == [(5.0, 0.2), (10.0, 0.4)]  # only its own stage's rows
    assert list(lines["toy world: attribute recall / precision"]) == [
        "rollout/toy/recall", "rollout/toy/precision"]  # constant but not 0: kept
    assert len(lines["reward (mean)"]["reward/mean"]) == 8


def test_kl_is_plotted_when_it_moves_and_nothing_when_nothing_was_logged(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert chosen_curves([]) == [] and plot_training_curves([], tmp_path / "none.png") is None
    for step in (1, 2, 3):
        log.log(step, {"train/av/kl": 0.01 * step, "train/av/approx_kl": 0.0}, stage="rl")
    (curve, lines), = chosen_curves(log.read())
    assert curve.title == "KL" and list(lines) == ["train/av/kl"]


def test_figure_and_report_guide(tmp_path):
    rows = _metrics_jsonl(tmp_path / "metrics.jsonl")
    out = plot_training_curves(rows, tmp_path / "training_curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    guide = curve_guide(rows)
    json.dumps(guide)  # it goes into report.json
    text = "\n".join(_curves_section(guide))
    assert "**RL: reward (mean)** (`reward/mean`): rises" in text
    assert "`rollout/toy/recall`, `rollout/toy/precision`" in text and "KL" not in text
    assert _curves_section([]) == []


def test_line_labels_drop_only_the_shared_path():
    from launch.eval_plots import _labels

    assert _labels(["eval/ar/fve", "train/ar/fve"]) == ["eval/ar/fve", "train/ar/fve"]
    assert _labels(["rollout/toy/recall", "rollout/toy/precision"]) == ["recall", "precision"]
