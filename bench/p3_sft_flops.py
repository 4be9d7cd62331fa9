"""P3: achieved FLOP/s of an AV-SFT step on a learner group ÷ this machine's matmul FLOP/s.

Both are measured in this run. The SFT step runs on a 2-rank FSDP2 learner group (Ray actors,
gloo, one thread per rank), so the peak is ``torch.matmul`` of large fp32 matrices using as many
cores as the group has ranks: the larger of one process with that many threads and ``ranks ×``
the one-thread rate (a 2-thread matmul scales imperfectly, so the latter is usually larger). A single-process step (same threads) is measured too, to show
what the distribution itself costs. Goal: group ratio ≥ 0.5.

FLOPs of a step are counted from the matmuls actually run, on the padded micro-batches:
forward = Σ_linear 2·in·out per token (q, k, v, o, gate, up, down) + attention 2·2·T²·d_head·heads
per layer and sequence (scores and values, full T×T as SDPA computes it) + lm_head 2·d·V on the
kept logit positions; training = 3 × forward (backward ≈ 2 × forward).

    python bench/p3_sft_flops.py [--hidden 512] [--layers 4] [--batch 16] [--micro 4] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.5
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def matmul_flops_per_s(threads: int, n: int = 2048, repeats: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def step_flops(config, batch) -> float:
    """Matmul FLOPs of one training step over the padded ``batch`` (see the module doc)."""
    from nla_rl.sft import IGNORE_INDEX

    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    per_token = layers * 2 * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    rows, width = batch.input_ids.shape
    attention = layers * 2 * 2 * width * width * head * config.num_attention_heads * rows
    targets = batch.labels != IGNORE_INDEX
    first = int(targets.float().argmax(dim=1)[targets.any(dim=1)].min())
    head_flops = 2 * d * config.vocab_size * rows * (width - first + 1)
    return 3.0 * (per_token * rows * width + attention + head_flops)


def build(out_dir: Path, hidden: int, layers: int):
    import torch
    from transformers import AutoModelForCausalLM

    from nla_rl.sidecar import make_token_meta
    from nla_rl.templates import DEFAULT_AV_TEMPLATE
    from nla_rl.testing.tiny import build_tiny_tokenizer, tiny_config

    tok = build_tiny_tokenizer("qwen2", out_dir)
    heads = hidden // 32
    config = tiny_config("qwen2", len(tok), layers=layers, hidden=hidden, heads=heads,
                         kv_heads=max(1, heads // 4), intermediate=4 * hidden, tokenizer=tok)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return config, tok, make_token_meta(tok, DEFAULT_AV_TEMPLATE, None).marker


def rows_for(batch: int, hidden: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = "the blue sea a red house cats rain numbers green door tall old".split()
    texts = [" ".join(rng.choice(words, size=60)) for _ in range(batch)]
    return {"explanations": texts, "vectors": rng.standard_normal((batch, hidden)).astype("float32")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from actors.backends import OptimSpec
    from actors.learner import LearnerGroup, LearnerSpec
    from actors.learner_models import ModelSpec
    from nla_rl.roundtrip import InjectionSpec
    from nla_rl.sft import build_av_sft_batch, micro_batches
    from nla_rl.templates import DEFAULT_AV_TEMPLATE

    with tempfile.TemporaryDirectory() as tmp:
        config, tok, marker = build(Path(tmp), args.hidden, args.layers)
        model = ModelSpec(role="av", model_dir=tmp, marker=marker, av_template=DEFAULT_AV_TEMPLATE,
                          injection=InjectionSpec("replace", 10.0))
        optim = OptimSpec(lr=1e-4, weight_decay=0.0, warmup_steps=0, total_steps=100,
                          schedule="constant", grad_clip=1.0)
        spec = LearnerSpec(model=model, optim=optim, micro_batch_size=args.micro)
        batches = [rows_for(args.batch, args.hidden, s) for s in range(args.steps + 1)]
        flops = [sum(step_flops(config, m) for share in _shares(b, args.ranks)
                     for m in micro_batches(build_av_sft_batch(
                         tok, share["explanations"], share["vectors"], marker=marker,
                         template=DEFAULT_AV_TEMPLATE), args.micro)) for b in batches]
        peak = max(matmul_flops_per_s(args.ranks), args.ranks * matmul_flops_per_s(1))
        single = _single_process(spec, batches, flops, threads=args.ranks)
        ray.init(num_cpus=max(4, args.ranks), include_dashboard=False, log_to_driver=False)
        group = LearnerGroup(spec, world_size=args.ranks, num_cpus_per_rank=1.0)
        try:
            group.train_step(batches[0], loss="av_sft")  # warm-up (first-call allocations)
            started = time.perf_counter()
            for b in batches[1:]:
                group.train_step(b, loss="av_sft")
            seconds = time.perf_counter() - started
        finally:
            group.shutdown()
            ray.shutdown()
    achieved = sum(flops[1:]) / seconds
    print(f"matmul peak ({args.ranks} cores): {peak / 1e9:.1f} GFLOP/s")
    print(f"single process SFT step ({args.ranks} threads): {single / 1e9:.1f} GFLOP/s "
          f"= {single / peak:.0%} of peak")
    print(f"learner group SFT step ({args.ranks} ranks x 1 thread, FSDP2/gloo): "
          f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of peak "
          f"({seconds / args.steps:.2f} s/step, {sum(flops[1:]) / args.steps / 1e9:.1f} GFLOP/step)")
    print(f"P3 ratio {achieved / peak:.2f} (goal >= {GOAL})")


def _shares(rows: dict, ranks: int) -> list[dict]:
    from actors.learner import split_rows

    return split_rows(rows, ranks)


def _single_process(spec, batches, flops, *, threads: int) -> float:
    """FLOP/s of the same steps in this process (no sharding, no communication)."""
    import torch

    from actors.learner_models import build_model, load_tokenizer
    from actors.losses import get_loss
    from nla_rl.optim import build_optimizer, guarded_step
    from nla_rl.sft import micro_batches

    torch.set_num_threads(threads)

    class Rank:  # what the loss builders read from a learner rank
        pass

    rank = Rank()
    rank.spec, rank.rank, rank.tokenizer = spec, 0, load_tokenizer(spec.model)
    model = build_model(spec.model, seed=0)
    opt = build_optimizer(list(model.named_parameters()), lr=1e-4, weight_decay=0.0)
    loss = get_loss("av_sft", "av")

    def step(rows):
        micros = list(micro_batches(loss.build(rank, rows), spec.micro_batch_size))
        total = sum(loss.count(m) for m in micros)
        for m in micros:
            value = loss.compute(rank, model, m).loss_sum
            (value / total).backward()
        guarded_step(list(model.parameters()), opt, None, max_norm=1.0)

    step(batches[0])
    started = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return sum(flops[1:]) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
