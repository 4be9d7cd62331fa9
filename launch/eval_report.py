"""The eval report as Markdown (the same numbers as ``report.json``)."""

from __future__ import annotations

import math

# Truth first: where ground truth exists an explanation is judged by whether it is true; then
# whether it picks its own activation out of hard negatives; FVE and the rest after.
ROWS = (("toy_precision", "toy-world attribute precision (stated values that are true)"),
        ("toy_recall", "toy-world attribute recall"),
        ("toy_slot_recall", "toy-world slot recall (optional slots, any value)"),
        ("toy_slot_precision", "toy-world slot precision (optional slots, any value)"),
        ("top1", "top-1 retrieval vs hard negatives"),
        ("top1_centred", "top-1 retrieval vs hard negatives, centred cosine"),
        ("gap", "hard-negative gap"),
        ("fve", "FVE (paper definition)"), ("cosine", "mean cosine(ĥ, h)"),
        ("mse", "mean normalised MSE (2 = orthogonal)"),
        ("extraction_failure_rate", "extraction-failure rate"), ("cjk_rate", "CJK rate"))


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _baselines_section(report: dict) -> list[str]:
    """The evaluated pair beside the run's earlier pairs on the same rows (none: no section)."""
    baselines = report.get("baselines") or {}
    if not baselines:
        return []
    labels = list(baselines)
    lines = ["## Against earlier stages", "",
             "The same rows, generation settings and hard negatives, scored with the run's "
             "earlier AV/AR pairs: what the later stages added.", "",
             "| metric | model | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for key, name in ROWS:
        if key in report["metrics"]:
            lines.append(f"| {name} | {_fmt(report['metrics'][key])} | " + " | ".join(
                _fmt(baselines[b]["metrics"].get(key)) for b in labels) + " |")
    return lines + [""]


def _metrics_table(report: dict) -> list[str]:
    controls = report["controls"]
    lines = ["| metric | model | control: shuffled | control: no injection |", "|---|---|---|---|"]
    for key, name in ROWS:
        if key not in report["metrics"]:
            continue
        lines.append(f"| {name} | {_fmt(report['metrics'][key])} | "
                     f"{_fmt(controls['shuffled'].get(key))} | {_fmt(controls['no_injection'].get(key))} |")
    return lines


def _headline(report: dict) -> list[str]:
    """One line that leads with truth: precision/recall (toy world) and top-1, then FVE."""
    m, c = report["metrics"], report["controls"]
    parts = []
    if "toy_precision" in m:
        parts.append(f"attribute precision {_fmt(m['toy_precision'])} / recall "
                     f"{_fmt(m['toy_recall'])} (shuffled control {_fmt(c['shuffled'].get('toy_precision'))}"
                     f" / {_fmt(c['shuffled'].get('toy_recall'))})")
    k = report["data"].get("hard_negatives_per_row")
    if "top1" in m and k:
        centred = f", centred {_fmt(m['top1_centred'])}" if "top1_centred" in m else ""
        parts.append(f"top-1 among {k} hard negatives {_fmt(m['top1'])}{centred} "
                     f"(chance {1 / (k + 1):.3f})")
    parts.append(f"FVE {_fmt(m.get('fve'))}")
    return [f"**Truth first:** {'; '.join(parts)}.", ""]


def render_markdown(report: dict) -> str:
    """The human-readable report."""
    m, d, s = report["models"], report["data"], report["settings"]
    lines = [
        "# NLA evaluation report", "",
        f"**Models evaluated: `{m['label']}`** — AV `{m['av']}` (stage {m['av_stage']}), "
        f"AR `{m['ar']}` (stage {m['ar_stage']}).", "",
        f"Data: {d['rows']} rows ({d['documents']} documents) of `{d['split']}`; "
        f"{d['hard_negatives_per_row']} hard negatives per row mined within these rows, "
        "same-document rows excluded.", "",
        f"Generation: greedy, max {s['max_new_tokens']} new tokens; injection "
        f"`{s['injection_family']}` (scale {_fmt(s['injection_scale'])}); "
        f"mse_scale {_fmt(s['mse_scale'])}.", "",
        *_headline(report),
        "## Round trip ĥ = AR(AV(h))", "", *_metrics_table(report), "",
        "Controls carry no information about the row: **shuffled** explains another row's vector; "
        "**no injection** generates with the marker's plain embedding. A model that uses the "
        "activation beats both.", "",
        *_baselines_section(report),
        "## Prefix curve", "", "FVE when the AR reads only the first n tokens of each explanation.", "",
        "| tokens | FVE | cosine |", "|---|---|---|",
        *[f"| {p['tokens']} | {_fmt(p['fve'])} | {_fmt(p['cosine'])} |" for p in report["prefix_curve"]],
        "", "## Plots", "", *[f"![{name}]({name})" for name in report["plots"]], "",
        *_curves_section(report.get("training_curves") or []),
        "## Samples", "",
    ]
    for sample in report["samples"]:
        lines += [f"- doc {sample['doc_id']} (MSE {_fmt(sample['mse'])}, cos {_fmt(sample['cosine'])}): "
                  f"{_one_line(sample['explanation'])}",
                  f"  - shuffled control: {_one_line(sample['shuffled_control'])}",
                  f"  - no-injection control: {_one_line(sample['no_injection_control'])}"]
    return "\n".join(lines) + "\n"


def _curves_section(curves: list[dict]) -> list[str]:
    """Which training curves to read, and what a healthy run shows in each (none: no section)."""
    if not curves:
        return []
    return ["What to look at in `training_curves.png` (metrics that were not logged, or stayed "
            "0, are left out):", "",
            *[f"- **{c['stage']}: {c['title']}** ({', '.join(f'`{m}`' for m in c['metrics'])}): "
              f"{c['read']}" for c in curves], ""]


def _one_line(text) -> str:
    return "*(no explanation extracted)*" if text is None else " ".join(str(text).split())[:300]
