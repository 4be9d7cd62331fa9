"""Peak host memory of one FSDP2 rank while it loads, whole vs sharded (2 gloo ranks, CPU).

    python bench/p10_sharded_load.py [--layers 24] [--dtype bfloat16]

Builds a random model of Qwen2.5-0.5B's shape from its config (d 896, 24 layers, MLP 4864,
14/2 heads, V 151,936, tied embeddings; nothing downloaded), saves it as safetensors in a temp
directory (bf16 as published), then starts 2 ranks twice: once loading the whole model and
sharding it (``build_model`` + ``fully_shard``), once the sharded way (``build_empty_model`` +
``fully_shard`` + ``fill_shards``), the learner's own functions. Each rank reports its peak RSS
above its RSS before loading (``ru_maxrss``), and the memory plan's host figure beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2
MIB = 2**20


def build_checkpoint(out: Path, layers: int, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory; ``RssAnon``: its private memory alone, without the pages
    of the safetensors files it has mapped (page cache, shared by the ranks of a host)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class AnonPeak:
    """The highest ``RssAnon`` seen while it runs, sampled every millisecond by a thread."""

    def __enter__(self):
        import threading

        self.peak, self.done = rss_mib("RssAnon"), False

        def sample():
            while not self.done:
                self.peak = max(self.peak, rss_mib("RssAnon"))
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss_mib("RssAnon"))


def _rank(rank: int, port: int, model_dir: str, sharded: bool, out: str) -> None:
    from actors.backends.fsdp2 import shard
    from actors.learner_models import ModelSpec, build_empty_model, build_model, decoder_blocks
    from actors.sharded_load import fill_shards

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    spec = ModelSpec(role="av", model_dir=model_dir)
    dist.barrier()
    before, anon_before = rss_mib(), rss_mib("RssAnon")
    with AnonPeak() as anon:
        if sharded:
            empty = build_empty_model(spec, seed=0)
            model = shard(empty.module, blocks=decoder_blocks(empty.module), device="cpu")
            fill_shards(model, device="cpu", locate=empty.locate, source=model_dir)
        else:
            model = build_model(spec, seed=0)
            shard(model, blocks=decoder_blocks(model), device="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    local = sum(p.to_local().numel() * 4 for p in model.parameters()) / MIB
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"peak_above_start_mib": peak - before, "after_mib": rss_mib() - before,
                   "anon_peak_mib": anon.peak - anon_before,
                   "own_shard_mib": local}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def measure(model_dir: Path, sharded: bool, tmp: Path) -> list[dict]:
    from actors.placement import free_port

    out = str(tmp / ("sharded" if sharded else "whole"))
    mp.spawn(_rank, args=(free_port(), str(model_dir), sharded, out), nprocs=WORLD, join=True)
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(WORLD)]


def main() -> None:
    from nla_rl.memory_plan import host_load_bytes, read_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_checkpoint(tmp / "model", args.layers, getattr(torch, args.dtype))
        shape = read_shape(tmp / "model")
        print(f"model: {shape.params / 1e6:.1f} M params, stored {args.dtype}, "
              f"fp32 whole = {4 * shape.params / MIB:.0f} MiB; {WORLD} ranks")
        for sharded in (False, True):
            ranks = measure(tmp / "model", sharded, tmp)
            plan = host_load_bytes(shape, WORLD, sharded_load=sharded) / MIB
            for r, m in enumerate(ranks):
                print(f"{'sharded' if sharded else 'whole  '} rank {r}: peak RSS "
                      f"{m['peak_above_start_mib']:.0f} MiB above start (private, without "
                      f"mapped file pages: {m['anon_peak_mib']:.0f} MiB), held after "
                      f"{m['after_mib']:.0f} MiB (own fp32 shard {m['own_shard_mib']:.0f} MiB); "
                      f"memory plan's host_load {plan:.0f} MiB")


if __name__ == "__main__":
    main()
