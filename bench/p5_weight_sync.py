"""P5: weight-sync time relative to the time of one RL step, for full weights and for LoRA.

Deployed shape: the vLLM engine in a Ray actor (:class:`actors.rollout.RolloutPool`), the learner
in this process. One RL step here = the engine generating ``prompts × group`` rollouts
(temperature 1) + the learner's teacher-forced forward/backward over them with the injection and
an AdamW step. The sync is what the loop does after each step:

* full: ``pool.sync_weights(learner.state_dict())`` (Ray transfer + bucketed ``reload_weights``);
* LoRA: ``save_pretrained`` of the adapter (temp dir + rename) + ``pool.sync_adapter(dir)``.

Medians of ``--repeats`` rounds. The verification probe (``verify_sync``) is timed separately.
Goal: sync / step ≤ 5%.

    python bench/p5_weight_sync.py [--hidden 256] [--layers 4] [--prompts 8] [--group 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.05
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def learner_step(model, optimizer, requests, groups, marker, spec) -> None:
    """One policy-gradient-shaped update: -mean log π(completion) with the injection, backward, step."""
    import torch

    from nla_rl.injection import inject

    rows = [(r, s.token_ids) for r, group in zip(requests, groups) for s in group if s.token_ids]
    seqs = [list(r.prompt_ids) + list(c) for r, c in rows]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    cols = [list(r.prompt_ids).index(marker.token_id) for r, _ in rows]
    positions = torch.tensor([[i, c] for i, c in enumerate(cols)])
    vectors = torch.stack([r.vector for r, _ in rows])
    with inject(model, family=spec.family, vectors=vectors, positions=positions, scale=spec.scale):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    completion = torch.zeros_like(logp, dtype=torch.bool)
    for i, (r, c) in enumerate(rows):
        completion[i, len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(c)] = True
    loss = -(logp * completion).sum() / completion.sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def save_adapter_atomic(model, out_dir: Path) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def measure(mode: str, args, model_dir: Path, work: Path) -> dict:
    """Median step / sync / verify seconds for ``mode`` in {"full", "lora"}."""
    import torch
    from transformers import AutoModelForCausalLM

    from actors.rollout import RolloutPool
    from rollout.base import EngineSpec
    from rollout.base import SamplingSpec
    from rollout.hf_engine import teacher_forced_logprobs

    setup = json.loads((model_dir / "bench.json").read_text())
    marker, spec, requests = setup_objects(setup, args)
    learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine_kwargs = dict(model_dir=str(model_dir), marker=marker, injection=spec, kv_cache_gib=0.5,
                         lora_rank=args.lora_rank if mode == "lora" else 0)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        learner = get_peft_model(learner, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                     target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    pool = RolloutPool(EngineSpec.from_kwargs("vllm", **engine_kwargs), num_engines=1,
                       num_cpus_per_engine=1, omp_binds=[f"0-{args.threads - 1}"])
    adapter_dir = work / f"adapter_{mode}"

    def sync():
        if mode == "full":
            pool.sync_weights(learner.state_dict().items())
        else:
            save_adapter_atomic(learner, adapter_dir)
            pool.sync_adapter(str(adapter_dir))

    sampling = SamplingSpec(n=args.group, temperature=1.0, max_new_tokens=args.max_new)
    probe = (requests[:2], [[1, 2, 3, 4]] * 2)
    sync()  # first load (LoRA) and warm-up
    pool.generate(requests[:1], SamplingSpec(n=1, max_new_tokens=4))
    gen_s, step_s, sync_s, verify_s = [], [], [], []
    for round_ in range(args.repeats):
        t_gen, groups = timed(lambda: pool.generate(requests, sampling.shifted(round_ * 1000)))
        t_learn, _ = timed(lambda: learner_step(learner, optimizer, requests, groups, marker, spec))
        t_sync, _ = timed(sync)
        with torch.no_grad():
            expected = teacher_forced_logprobs(learner, [r.prompt_ids for r in probe[0]], probe[1],
                                               torch.stack([r.vector for r in probe[0]]),
                                               [setup["col"]] * 2, spec)
        t_verify, _ = timed(lambda: pool.verify_sync(expected, probe, tol=1e-3))
        gen_s.append(t_gen), step_s.append(t_gen + t_learn), sync_s.append(t_sync), verify_s.append(t_verify)
    pool.shutdown()
    med = statistics.median
    return {"generate_s": round(med(gen_s), 4), "step_s": round(med(step_s), 4),
            "sync_s": round(med(sync_s), 4), "verify_s": round(med(verify_s), 4),
            "sync_over_step": round(med(sync_s) / med(step_s), 4),
            "sync_and_verify_over_step": round((med(sync_s) + med(verify_s)) / med(step_s), 4)}


def setup_objects(setup: dict, args):
    import torch

    from nla_rl.roundtrip import InjectionSpec
    from nla_rl.tokens import MarkerTokens
    from rollout.base import RolloutRequest

    gen = torch.Generator().manual_seed(0)
    requests = [RolloutRequest(setup["prompt"], torch.randn(args.hidden, generator=gen), str(i))
                for i in range(args.prompts)]
    return MarkerTokens(*setup["marker"]), InjectionSpec("replace", scale=2.0), requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = str(Path(__file__).resolve().parents[1])  # Ray workers import rollout/ from the checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    from actors.cluster import connect_ray
    from bench.p1_engine_throughput import build

    connect_ray(num_cpus=4)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        _, marker, prompt = build(model_dir, args.hidden, args.layers)
        (model_dir / "bench.json").write_text(json.dumps(
            {"prompt": prompt, "marker": list(marker.__dict__.values()), "col": prompt.index(marker.token_id)}))
        results = {mode: measure(mode, args, model_dir, Path(tmp)) for mode in ("full", "lora")}
    met = all(r["sync_over_step"] <= GOAL for r in results.values())
    print(json.dumps({"bench": "p5_weight_sync", "hidden": args.hidden, "layers": args.layers,
                      "rollouts_per_step": args.prompts * args.group, "max_new_tokens": args.max_new,
                      **results, "goal": GOAL, "met": met}, indent=1))


if __name__ == "__main__":
    main()
