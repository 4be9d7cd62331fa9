"""Metrics always go to ``<run>/logs/metrics.jsonl`` (W&B, when enabled, mirrors them)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from nla_rl.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSON-lines log; one line per ``log`` call, flushed immediately."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float], **context) -> dict:
        """Write ``{"step", "time", **context, **metrics}``; non-finite numbers become null."""
        row = {"step": step, "time": round(time.time(), 3), **context}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else None
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")
        return row

    def read(self) -> list[dict]:
        """Every row written so far (empty when the file does not exist yet)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def rewind(self, step: int, stage: str) -> int:
        """Drop the rows of ``stage`` logged after ``step`` (a resumed stage logs them again, so
        plots and W&B see one history), and a torn last line of a killed run; other stages' rows
        are kept in order. The file is replaced atomically. Returns the rows dropped."""
        return rewind_jsonl(self.path, lambda row: row.get("stage") == stage
                            and row.get("step", 0) > step)


def rewind_jsonl(path: Path, drop) -> int:
    """Rewrite the JSON-lines file ``path`` without the rows where ``drop(row)`` is true (and
    without undecodable lines: a line torn by a kill), atomically; untouched if nothing drops."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or drop(row):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
