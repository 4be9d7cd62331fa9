"""Rollout actors: one engine per Ray actor, and a pool that spreads a batch over them.

Each actor runs its vLLM engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: faster start and
2-3x the throughput of tiny models on CPU), which reseeds the process's global RNG and pins its
threads — harmless in a dedicated actor, the reason it never shares a learner's process. Every
actor gets its own ``VLLM_CPU_OMP_THREADS_BIND`` so engines do not fight over the same cores.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import ray

from rollout.base import RolloutRequest, Sample, SamplingSpec


class RolloutActor:
    """Ray actor body hosting one :class:`rollout.base.RolloutEngine`."""

    def __init__(self, kind: str, engine_kwargs: dict, *, omp_bind: str | None = None,
                 num_threads: int = 1):
        # Before vLLM is imported: it reads these once.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        if omp_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
        import torch

        torch.set_num_threads(num_threads)
        from rollout.base import make_engine

        self.engine = make_engine(kind, **engine_kwargs)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        return self.engine.generate(requests, sampling)

    def sync_weights(self, named_tensors: list) -> None:
        self.engine.sync_weights(named_tensors)

    def sync_adapter(self, adapter_dir: str) -> None:
        self.engine.sync_adapter(adapter_dir)

    def logprobs(self, requests, completions) -> list[list[float]]:
        return self.engine.logprobs(requests, completions)

    def verify_sync(self, expected_logprobs, probe, tol: float) -> float:
        return self.engine.verify_sync(expected_logprobs, probe, tol)

    def health(self) -> dict:
        return {"pid": os.getpid(), **self.engine.health()}


def core_binds(num_engines: int, num_cores: int | None = None) -> list[str]:
    """Disjoint core ranges (``VLLM_CPU_OMP_THREADS_BIND`` syntax) for ``num_engines`` engines;
    engines share cores round-robin when there are more engines than cores."""
    cores = num_cores or os.cpu_count() or 1
    share = max(1, cores // num_engines)
    binds = []
    for i in range(num_engines):
        first = (i * share) % cores
        last = min(first + share, cores) - 1
        binds.append(str(first) if first == last else f"{first}-{last}")
    return binds


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges covering ``range(count)``, sizes within 1."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


class RolloutPool:
    """Several :class:`RolloutActor` s: a batch is split into contiguous slices (one per actor),
    results come back in request order; weight syncs and verification go to every actor."""

    def __init__(self, kind: str, engine_kwargs: dict, *, num_engines: int = 1,
                 num_cpus_per_engine: float = 1.0, num_gpus_per_engine: float = 0.0,
                 omp_binds: Sequence[str] | None = None, num_threads: int = 1):
        binds = list(omp_binds) if omp_binds is not None else core_binds(num_engines)
        actor_cls = ray.remote(num_cpus=num_cpus_per_engine, num_gpus=num_gpus_per_engine)(RolloutActor)
        self.actors = [actor_cls.remote(kind, engine_kwargs, omp_bind=binds[i], num_threads=num_threads)
                       for i in range(num_engines)]
        ray.get([a.health.remote() for a in self.actors])  # surface start-up errors here

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        """Request ``i`` is seeded ``sampling.seed + i`` whichever actor serves it."""
        requests = list(requests)
        ranges = [(lo, hi) for lo, hi in split_evenly(len(requests), len(self.actors)) if hi > lo]
        futures = [actor.generate.remote(requests[lo:hi], sampling.shifted(lo))
                   for actor, (lo, hi) in zip(self.actors, ranges)]
        return [group for part in ray.get(futures) for group in part]

    def sync_weights(self, named_tensors: Iterable) -> None:
        ref = ray.put([(name, t.detach().cpu()) for name, t in named_tensors])
        ray.get([a.sync_weights.remote(ref) for a in self.actors])

    def sync_adapter(self, adapter_dir: str) -> None:
        ray.get([a.sync_adapter.remote(str(adapter_dir)) for a in self.actors])

    def verify_sync(self, expected_logprobs, probe, tol: float = 1e-3) -> float:
        """Max |Δ| over every actor; raises (the first actor's error) if any sync did not apply."""
        return max(ray.get([a.verify_sync.remote(expected_logprobs, probe, tol) for a in self.actors]))

    def health(self) -> list[dict]:
        return ray.get([a.health.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def pool_from_recipe(cfg, *, model_dir: str, marker, injection, max_model_len: int = 1024,
                     num_cpus_per_engine: float = 1.0) -> RolloutPool:
    """The rollout pool a recipe asks for (``cfg.engine``), serving ``model_dir`` with the run's
    resolved marker and :class:`nla_rl.roundtrip.InjectionSpec` (read from the sidecar)."""
    import torch

    engine_kwargs = dict(model_dir=str(model_dir), marker=marker, injection=injection,
                         kv_cache_gib=cfg.engine.kv_cache_gib,
                         gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                         lora_rank=cfg.learner.lora_rank, seed=cfg.run.seed, max_model_len=max_model_len,
                         dtype=cfg.model.dtype)
    tensor_parallel = getattr(cfg.engine, "tensor_parallel_size", 1)
    if tensor_parallel > 1:
        engine_kwargs["tensor_parallel_size"] = tensor_parallel
    return RolloutPool(cfg.engine.kind, engine_kwargs, num_engines=cfg.engine.num_engines,
                       num_cpus_per_engine=num_cpus_per_engine,
                       num_gpus_per_engine=float(tensor_parallel) if torch.cuda.is_available() else 0.0)
