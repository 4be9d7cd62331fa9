"""Metrics always go to ``<run>/logs/metrics.jsonl`` (W&B, when enabled, mirrors them)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


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
