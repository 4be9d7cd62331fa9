"""P12: what the whitened AV input (``injection.whiten``) costs as the width d grows.

Per width d (activations: ``--rows`` random rows with one shared large direction, as real
residual streams have):

* fit: wall time of ``fit_injection_centre(rows, whiten=0.01)`` (a d×d covariance from n rows,
  then one fp64 ``eigh``) against the centre alone (μ only), and the exponent of its growth in d
  between the widths measured (``eigh`` is O(d³), the covariance O(n·d²));
* file: the size of ``[μ; W]`` (float32, ``4·(d+1)·d`` bytes) against μ alone;
* apply: ``InjectionSpec.av_input`` on a batch of ``--batch`` rows, whitened ÷ centred (best of
  ``--repeats``), and the whitening's FLOPs per injected row (2·d²) as a share of one token's
  forward pass through a decoder with that width (≈ 2 · 12·L·d² FLOPs, L from the model presets
  below), which is what it adds to the AV's prompt pass.

Run: ``OMP_NUM_THREADS=2 python bench/p12_input_whitening.py`` (about 1 min on 2 cores with the
default widths; ``--dims 8192`` adds a 70B-width fit, about 2-3 min more).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from nla_rl.injection import InjectionSpec, fit_injection_centre

# hidden size → decoder layers of a model with that width (Qwen2.5-1.5B, -7B, Llama-3.1-8B, -70B)
LAYERS = {1536: 28, 3584: 28, 4096: 32, 8192: 80}
LAMBDA = 0.01


def rows_for(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hub = rng.standard_normal(d).astype(np.float32) * 4
    return hub + rng.standard_normal((n, d), dtype=np.float32)


def best_of(repeats: int, fn) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(d: int, n: int, batch: int, repeats: int) -> dict:
    rows = rows_for(n, d)
    started = time.perf_counter()
    centre = fit_injection_centre(rows)
    centre_s = time.perf_counter() - started
    started = time.perf_counter()
    fitted = fit_injection_centre(rows, whiten=LAMBDA)
    fit_s = time.perf_counter() - started
    vectors = torch.from_numpy(rows[:batch])
    centred, whitened = (InjectionSpec("replace", 1.0, centre=c) for c in (centre, fitted))
    apply_centred = best_of(repeats, lambda: centred.av_input(vectors))
    apply_white = best_of(repeats, lambda: whitened.av_input(vectors))
    layers = LAYERS.get(d, 32)
    return {"d": d, "n": n, "fit_s": fit_s, "centre_s": centre_s,
            "file_mb": fitted.numel() * 4 / 2**20, "centre_kb": centre.numel() * 4 / 2**10,
            "apply_ratio": apply_white / apply_centred, "apply_ms": apply_white * 1e3,
            "forward_share": (2 * d * d) / (2 * 12 * layers * d * d), "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", default="1536,3584,4096", help="widths d, comma-separated")
    parser.add_argument("--rows", type=int, default=16000, help="AV-SFT rows the map is fitted on")
    parser.add_argument("--batch", type=int, default=256, help="rows per av_input call")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = [measure(int(d), args.rows, args.batch, args.repeats)
               for d in args.dims.split(",")]
    print(f"fit on {args.rows} rows, λ = {LAMBDA}; av_input on {args.batch} rows "
          f"(best of {args.repeats}); torch threads {torch.get_num_threads()}")
    print("| d | fit s (whitened) | fit s (centre only) | [μ; W] MB | μ KB | av_input whitened ÷ "
          "centred | av_input ms | whitening ÷ one token's forward (L layers) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['d']} | {r['fit_s']:.2f} | {r['centre_s']:.3f} | {r['file_mb']:.1f} | "
              f"{r['centre_kb']:.1f} | {r['apply_ratio']:.1f} | {r['apply_ms']:.2f} | "
              f"{r['forward_share']:.2%} (L = {r['layers']}) |")
    for a, b in zip(results, results[1:]):
        exponent = math.log(b["fit_s"] / a["fit_s"]) / math.log(b["d"] / a["d"])
        print(f"fit time grows as d^{exponent:.2f} from d = {a['d']} to {b['d']}")


if __name__ == "__main__":
    main()
