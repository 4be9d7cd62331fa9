"""P6: resident memory of a loaded activation split, relative to its raw float32 bytes.

Builds an ``n × d`` split (default 100k × 512) in a temp dir, as parquet (the storage contract)
and as an Arrow IPC cache, then loads each with :func:`nla_rl.data.store.read_activations` in a
*fresh* child process (so the build's memory does not blur the numbers) and reads VmRSS/VmHWM
from ``/proc/self/status`` before and after. The loaded array is summed once, so memory-mapped
pages are resident too. Goal: resident/raw ≤ 1.2.

    python bench/p6_activation_memory.py [--rows 100000] [--d 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.2
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(path: Path, rows: int, d: int, chunk: int = 10_000) -> None:
    """Write ``rows`` random float32 vectors of size ``d`` to ``path`` shard by shard."""
    import numpy as np

    from nla_rl.data.store import ActivationWriter, activations_table

    rng = np.random.default_rng(0)
    with ActivationWriter(path, d) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = np.arange(start, start + n)
            vec = rng.standard_normal((n, d), dtype=np.float32)
            w.write(activations_table(ids // 10, ids % 10 + 50, 12, vec))


def _to_arrow_cache(parquet: Path, arrow: Path) -> None:
    """The zero-copy Arrow IPC cache of ``parquet`` (one record batch)."""
    import pyarrow.parquet as pq

    from nla_rl.data.store import write_table_atomic

    write_table_atomic(pq.read_table(parquet), arrow)


def measure(path: Path) -> dict:
    """Run in the child: load ``path`` and report memory in bytes."""
    import numpy as np  # noqa: F401  (imported before the baseline: not part of the data)

    from nla_rl.data.store import read_activations

    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    arr = read_activations(path)
    seconds = time.perf_counter() - t0
    float(arr.sum(dtype="float64"))  # touch every page
    after, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    return {"raw": arr.nbytes, "resident": (after - before) * 1024, "peak": (peak - before) * 1024,
            "seconds": seconds, "contiguous": bool(arr.flags.c_contiguous), "dtype": str(arr.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    raw_mb = args.rows * args.d * 4 / 2**20
    print(f"P6: {args.rows} x {args.d} float32 = {raw_mb:.1f} MiB raw")
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        parquet, arrow = Path(tmp) / "rl.parquet", Path(tmp) / "rl.arrow"
        build(parquet, args.rows, args.d)
        _to_arrow_cache(parquet, arrow)
        for suffix, path in ((".parquet", parquet), (".arrow", arrow)):
            out = subprocess.run([sys.executable, __file__, "--measure", str(path)],
                                 capture_output=True, text=True, check=True)
            r = results[suffix] = json.loads(out.stdout)
            print(f"  {suffix:8s} file {path.stat().st_size / 2**20:7.1f} MiB  load {r['seconds']:.2f} s  "
                  f"resident/raw {r['resident'] / r['raw']:.2f}  peak/raw {r['peak'] / r['raw']:.2f}  "
                  f"contiguous={r['contiguous']} {r['dtype']}")
    ratio = results[".parquet"]["resident"] / results[".parquet"]["raw"]
    print(f"P6 resident/raw = {ratio:.2f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
