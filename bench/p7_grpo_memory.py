"""P7: peak memory of one GRPO micro-step at a real vocabulary, divided by its lower bound.

The policy is a random-weight Qwen2.5-0.5B-shaped model built from ``Qwen2Config`` (vocabulary
151,936, d = 896, 14 heads / 2 KV heads, MLP 4,864, tied embeddings; 2 layers by default;
nothing is downloaded), fp32 with AdamW as the learner builds it. One micro-batch of 4 rollouts
(a 96-token prompt with the marker + completions of 40–160 tokens, right-padded to 256) goes
through :func:`nla_rl.rl_batch.grpo_micro_loss` (injection, PPO clip, KL, IS), backward and
the optimiser step, in two variants:

* ``full``: the old log-prob formula (``[B, T, V]`` fp32 logits, ``/ T``, ``log_softmax``, gather);
* ``lean``: :mod:`nla_rl.logprobs` (logits only at the completion tokens, in chunks).

Each variant runs in a *fresh* child process. The optimiser state is created first (a step on
zero gradients, as after step 1 of a run); then for each phase (forward, backward, and the
optimiser step that follows the step's last micro-batch) the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) and the phase's peak resident memory read from ``VmHWM``, minus the
RSS before the model was built. The micro-step's peak is that of its forward and backward; the
optimiser step's is printed beside it (torch's AdamW allocates temporaries the size of the
largest parameter, the 545 MB embedding here, which no log-prob formula changes). The lower bound, computed in a third child:
weights + gradients + AdamW's two moments (4 × 4 bytes × parameters) + the activations the
decoder body saves for backward (unique storages seen by ``saved_tensors_hooks`` in the body's
forward, parameters excluded) + the scored rows' final hidden states. Goal: lean peak/bound ≤ 1.5.

    python bench/p7_grpo_memory.py [--layers 2] [--rows 4] [--threads 1]

(``--rows 8``, the issue's 8 × 256 example, takes about twice as long: the full variant's
``[8, 255, 151936]`` fp32 tensors are 1.2 GB each.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GOAL = 1.5
VOCAB, D, HEADS, KV_HEADS, MLP = 151_936, 896, 14, 2, 4_864
PROMPT, WIDTH = 96, 256
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Set VmHWM to the current RSS (Linux ≥ 4.0), so the next peak is the step's own."""
    Path("/proc/self/clear_refs").write_text("5")


def _model(layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP,
                         num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch(rows: int):
    """``rows`` rollouts: the same prompt (marker at column 10) and completions of 40–160 tokens."""
    import torch

    from nla_rl.grpo import PolicyLossSettings
    from nla_rl.rl_batch import build_policy_batch
    from nla_rl.tokens import MarkerTokens

    marker = MarkerTokens("m", token_id=1000, left_id=1001, right_id=1002)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2000, VOCAB, (PROMPT,), generator=g).tolist()
    prompt[9:12] = [1001, 1000, 1002]
    lengths = [40 + (WIDTH - PROMPT - 40) * i // max(rows - 1, 1) for i in range(rows)]
    completions = [torch.randint(2000, VOCAB, (n,), generator=g).tolist() for n in lengths]
    logp = [[-11.9] * n for n in lengths]  # ≈ log(1/V): a random model's log-probs
    batch = build_policy_batch([prompt] * rows, completions, torch.randn(rows, D, generator=g),
                               torch.linspace(-1, 1, rows), marker=marker, pad_id=0,
                               engine_logp=logp, old_logp=logp, ref_logp=logp)
    batch.settings = PolicyLossSettings(kl_beta=0.01, mismatch_threshold=None)
    return batch


def measure(variant: str, layers: int, rows: int) -> dict:
    """In the child: peak RSS of one micro-step (forward, backward, optimiser step)."""
    import torch

    from nla_rl.optim import build_optimizer
    from nla_rl.rl_batch import grpo_micro_loss
    from nla_rl.roundtrip import InjectionSpec

    batch = _batch(rows)
    before = _status_kib("VmRSS")
    model = _model(layers).train()
    optimizer = build_optimizer(list(model.named_parameters()), lr=1e-6, weight_decay=0.0)
    for p in model.parameters():  # AdamW's moments exist from the first step of a run on
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases, started = {}, time.perf_counter()

    def phase(name, work):  # the peak of each phase, from a fresh mark
        _reset_peak()
        result = work()
        phases[name] = (_status_kib("VmHWM") - before) * 1024
        return result

    out = phase("forward", lambda: grpo_micro_loss(
        model, batch, InjectionSpec("replace", 8.0), batch.settings, 1.0, lean=variant == "lean"))
    phase("backward", lambda: (out.loss_sum / out.normalizer).backward())
    phase("step", optimizer.step)
    return {"peak": max(phases["forward"], phases["backward"]), "phases": phases,
            "seconds": time.perf_counter() - started,
            "loss": float(out.loss_sum.detach() / out.normalizer)}


def lower_bound(layers: int, rows: int) -> dict:
    """In the child: 16 bytes per parameter + the body's saved activations + scored rows."""
    import torch

    from nla_rl.injection import inject

    batch = _batch(rows)
    model = _model(layers).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    n_params = sum(p.numel() for p in model.parameters())  # tied head counted once
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            inject(model, family="replace", vectors=batch.vectors, scale=8.0,
                   positions=batch.marker_positions):
        model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    use_cache=False)
    scored = int(batch.response_mask.sum())
    return {"params": n_params, "states": 16 * n_params, "activations": sum(saved.values()),
            "scored_rows": scored * (D + 1) * 4, "tokens": int(batch.attention_mask.sum()),
            "padded": batch.input_ids.numel(), "scored": scored}


def _plan(bound: dict, layers: int, *, lean: bool):
    """What the learner's memory plan predicts for this shape and micro-batch (fp32, 1 rank)."""
    from nla_rl.memory_plan import ModelShape, plan_rank

    shape = ModelShape(params=bound["params"], d_model=D, layers=layers, intermediate=MLP,
                       vocab=VOCAB, linear_shapes={})
    return plan_rank(shape, role="av", world_size=1, sharded_weights=True,
                     compute_dtype="float32", lean_logprobs=lean)


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=("full", "lean", "bound"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        result = lower_bound(args.layers, args.rows) if args.child == "bound" else \
            measure(args.child, args.layers, args.rows)
        print(json.dumps(result))
        return
    common = ["--layers", str(args.layers), "--rows", str(args.rows), "--threads",
              str(args.threads)]
    bound = _child("--child", "bound", *common)
    total = bound["states"] + bound["activations"] + bound["scored_rows"]
    gib = 2**30
    print(f"P7: Qwen2.5-0.5B shape (V={VOCAB}, d={D}), {args.layers} layers, "
          f"{bound['params'] / 1e6:.1f}M params; micro-batch {args.rows} x {WIDTH} "
          f"({bound['tokens']} real tokens, {bound['scored']} scored)")
    print(f"  lower bound {total / gib:.2f} GiB = weights+grads+AdamW {bound['states'] / gib:.2f}"
          f" + saved activations {bound['activations'] / gib:.2f}"
          f" + scored hidden rows {bound['scored_rows'] / gib:.3f}")
    plans = {variant: _plan(bound, args.layers, lean=variant == "lean")
             for variant in ("full", "lean")}
    activations = plans["lean"].parts(bound["padded"])["activations"]
    print(f"  memory plan (nla_rl.memory_plan): static {plans['lean'].static / gib:.2f} GiB, "
          f"activations {activations / gib:.2f} GiB = {activations / bound['activations']:.2f}"
          f" x the measured saved activations")
    ratios, steps = {}, {}
    for variant in ("full", "lean"):
        r = _child("--child", variant, *common)
        ratios[variant], steps[variant] = r["peak"] / total, r["phases"]["step"] / total
        where = "  ".join(f"{k} {v / gib:.2f}" for k, v in r["phases"].items())
        planned = plans[variant].step(bound["padded"])
        print(f"  {variant:4s}: micro-step peak {r['peak'] / gib:.2f} GiB  peak/bound "
              f"{ratios[variant]:.2f}  peak/plan {r['peak'] / planned:.2f}  {r['seconds']:.1f} s"
              f"  loss {r['loss']:.4f}  (peak GiB by phase: {where})")
    print(f"P7 micro-step (forward + backward) peak/bound: full {ratios['full']:.2f} -> lean "
          f"{ratios['lean']:.2f} (goal <= {GOAL}); the optimiser step after it: full "
          f"{steps['full']:.2f}, lean {steps['lean']:.2f} (AdamW's per-parameter temporaries)")


if __name__ == "__main__":
    main()
