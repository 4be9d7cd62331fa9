"""Read what an offline W&B run recorded (``<logs>/wandb/offline-run-*/run-*.wandb``), so tests
assert on the history W&B would sync rather than grep bytes.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of records, each ``crc32 (4) | length (2) | kind (1) | body`` (kind 1 full, 2 first, 3 middle,
4 last: a long record spans blocks); a body is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path: Path):
    """Every record of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        parts += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            yield pb.Record.FromString(parts)
            parts = b""


def run_file(logs_dir: Path, timeout_s: float = 30.0) -> Path:
    """The one offline run's file, once W&B's service has written its exit record (it may
    still be flushing under a loaded CPU)."""
    deadline = time.monotonic() + timeout_s
    while True:
        files = list((Path(logs_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        if files and any(r.WhichOneof("record_type") == "exit" for r in records(files[0])):
            return files[0]
        assert time.monotonic() < deadline, f"no finished offline W&B run under {logs_dir}"
        time.sleep(0.5)


def history(logs_dir: Path) -> list[dict]:
    """The run's history rows (``_step`` and every logged value, JSON-decoded)."""
    rows = []
    for record in records(run_file(logs_dir)):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def step_metrics(logs_dir: Path) -> dict[str, str]:
    """``{glob or name: step metric}`` of the run's ``define_metric`` calls."""
    out = {}
    for record in records(run_file(logs_dir)):
        if record.WhichOneof("record_type") == "metric":
            out[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    return out


def exit_code(logs_dir: Path) -> int:
    for record in records(run_file(logs_dir)):
        if record.WhichOneof("record_type") == "exit":
            return record.exit.exit_code
    raise AssertionError("no exit record")
