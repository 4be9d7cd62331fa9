"""P9: full-weight sync bandwidth into a vLLM engine actor, relative to this machine's memcpy.

The policy is a random-weight Qwen2.5-0.5B-shaped model built from ``Qwen2Config`` (vocabulary
151,936, d = 896, 24 layers, 14 heads / 2 KV heads, MLP 4,864, tied embeddings: 494 M
parameters; nothing is downloaded), saved as bf16 safetensors and served in bf16 by ONE vLLM
engine actor (:class:`actors.rollout.RolloutPool`, the deployed shape). Timed: what the RL loop
does after each step, ``pool.sync_weights(state_dict.items())`` with this process as the
learner, end to end (median of ``--repeats``, after one warm-up sync). Bytes = the sum of the
tensors' ``nbytes`` (the tied ``lm_head.weight`` included: the coordinator sends it too). In
the same run: memcpy bytes/s (``torch`` ``copy_`` of a 256 MiB buffer with ``--threads``
threads, best of 5), and

    ratio = sync bytes/s ÷ memcpy bytes/s        goal ≥ 0.3

Where the time goes (medians, from the pool's ``last_sync``): ``put_s`` (this process puts the
weights into Ray's object store), ``fetch_s`` (the actor reads them back), ``load_s`` (the
engine's ``sync_weights``: vLLM's ``reload_weights``, its CPU repacking included); the rest is
Ray's call overhead. A pool without ``last_sync`` (before it existed) gives only ``engine_s``,
the engine's own ``sync_weights`` from its counters.

Checked, not timed: the warm-up sync sends perturbed weights (the probe's log-probs must move),
the timed syncs send the on-disk weights back, after which the engine's probe log-probs must
equal, within 1e-6, those it computed from the checkpoint before any sync (``verify_sync``).

    python bench/p9_sync_bandwidth.py [--layers 24] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.3
VOCAB, D, HEADS, KV_HEADS, MLP = 151_936, 896, 14, 2, 4_864
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def build(out_dir: Path, layers: int):
    """The bf16 Qwen2.5-0.5B-shaped model saved to ``out_dir`` with a tiny tokenizer (the
    probe only needs a marker and a few ids); returns (state dict, marker, prompt ids)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from nla_rl.templates import DEFAULT_AV_TEMPLATE, av_prompt_ids
    from nla_rl.testing.tiny import TINY_MARKER_CHAR, build_tiny_tokenizer
    from nla_rl.tokens import marker_tokens

    tok = build_tiny_tokenizer("qwen2", out_dir)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    marker = marker_tokens(tok, DEFAULT_AV_TEMPLATE, TINY_MARKER_CHAR)
    return model.state_dict(), marker, av_prompt_ids(tok, DEFAULT_AV_TEMPLATE, marker.char)


def memcpy_bytes_per_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-``repeats`` bytes/s of one large host-to-host copy (buffers far above the caches)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def perturbed(state: dict) -> dict:
    """``state`` with the final norm doubled: a small change every probe log-prob sees."""
    return {**state, "model.norm.weight": state["model.norm.weight"] * 2}


def time_syncs(pool, state: dict, repeats: int) -> tuple[list[float], list[dict]]:
    """Wall seconds of each ``pool.sync_weights`` and the pool's own split of it (if it has one)."""
    seconds, splits = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pool.sync_weights(state.items())
        seconds.append(time.perf_counter() - start)
        # The engine's own time (``reload_weights`` and its bucketing), from its counters.
        splits.append(dict(getattr(pool, "last_sync", {})) or
                      {"engine_s": pool.health()[0]["last_sync_s"]})
    return seconds, splits


def start_pool(model_dir: Path, marker, threads: int):
    from actors.rollout import RolloutPool
    from nla_rl.roundtrip import InjectionSpec
    from rollout.base import EngineSpec

    spec = EngineSpec.from_kwargs("vllm", model_dir=str(model_dir), marker=marker,
                                  injection=InjectionSpec("replace", scale=2.0), kv_cache_gib=0.25,
                                  max_model_len=256, dtype="bfloat16")
    return RolloutPool(spec, num_engines=1, num_cpus_per_engine=1, num_threads=threads,
                       omp_binds=[f"0-{threads - 1}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of the engine actor and of the memcpy (1: what an engine "
                             "actor gets on a 2-core machine)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = str(Path(__file__).resolve().parents[1])  # Ray workers import rollout/ from the checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    from actors.cluster import connect_ray
    from rollout.base import RolloutRequest

    connect_ray(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        state, marker, prompt = build(Path(tmp), args.layers)
        pool = start_pool(Path(tmp), marker, args.threads)
        gen = torch.Generator().manual_seed(0)
        probe = ([RolloutRequest(prompt, torch.randn(D, generator=gen), str(i)) for i in range(2)],
                 [[5, 6, 7, 8]] * 2)
        from_disk = pool.logprobs(*probe)
        pool.sync_weights(perturbed(state).items())  # warm-up; must move the probe
        moved = max(abs(a - b) for x, y in zip(pool.logprobs(*probe), from_disk) for a, b in zip(x, y))
        if moved < 1e-3:
            raise RuntimeError(f"the perturbed sync moved the probe by {moved}: it did not apply")
        seconds, splits = time_syncs(pool, state, args.repeats)
        exact = pool.verify_sync(from_disk, probe, tol=1e-6)
        pool.shutdown()
    memcpy = memcpy_bytes_per_s()
    nbytes = sum(t.nbytes for t in state.values())
    sync_bps = nbytes / statistics.median(seconds)
    split = {key: round(statistics.median(s[key] for s in splits), 3)
             for key in (splits[0] if splits else {})}
    ratio = sync_bps / memcpy
    print(json.dumps({"bench": "p9_sync_bandwidth", "layers": args.layers, "dtype": "bfloat16",
                      "parameters": sum(t.numel() for t in state.values()), "sync_bytes": nbytes,
                      "threads": args.threads, "sync_s": [round(s, 3) for s in seconds],
                      "sync_s_median": round(statistics.median(seconds), 3), "split_s": split,
                      "sync_gb_per_s": round(sync_bps / 1e9, 3),
                      "memcpy_gb_per_s": round(memcpy / 1e9, 3),
                      "probe_moved_by_perturbed_sync": round(moved, 4),
                      "probe_delta_after_sync": exact, "ratio": round(ratio, 4), "goal": GOAL,
                      "met": ratio >= GOAL}, indent=1))


if __name__ == "__main__":
    main()
