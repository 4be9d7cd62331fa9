"""Rollout actors: one engine per Ray actor, and a pool that spreads a batch over them.

Each actor runs its vLLM engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: faster start and
2-3x the throughput of tiny models on CPU), which reseeds the process's global RNG and pins its
threads — harmless in a dedicated actor, the reason it never shares a learner's process. Every
actor gets its own ``VLLM_CPU_OMP_THREADS_BIND`` so engines do not fight over the same cores.

A lost actor (its process died) is replaced by the pool and its slice re-run with the same seeds,
so an RL step survives it; a pool the cluster cannot hold fails at once instead of hanging.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import ray

from actors.cluster import current_actor_logs
from actors.deadline import CallDeadline, DeadlineMissed
from actors.placement import PlacementError
from nla_rl.errors import NLAError
from rollout.base import EngineSpec, RolloutRequest, Sample, SamplingSpec
from rollout.vllm_engine import weight_buckets
from rollout.vllm_worker import pack_tensor, unpack_tensor

# Weights travel through the object store in buckets of about this size: Ray can spill or move
# one bucket at a time, so no single object is the size of the whole model.
SYNC_BUCKET_BYTES = 512 << 20


class RolloutActor:
    """Ray actor body hosting one :class:`rollout.base.RolloutEngine`."""

    def __init__(self, spec: EngineSpec, *, omp_bind: str | None = None,
                 num_threads: int = 1, logs=None):
        from nla_rl.run_logs import redirect_process_output

        redirect_process_output(logs, "engine")  # first: vLLM logs from its import on
        # Before vLLM is imported: it reads these once.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
        if omp_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
        import torch

        torch.set_num_threads(num_threads)
        self.engine = spec.build()

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        return self.engine.generate(requests, sampling)

    def sync_weights(self, bucket_refs: list) -> dict[str, float]:
        """Load the weights the pool put in the object store: ``bucket_refs`` are ``ObjectRef`` s
        of packed buckets (inside a list, so Ray leaves them to this method to fetch). Returns the
        seconds spent fetching and loading them."""
        start = time.perf_counter()
        named = [(name, unpack_tensor(*packed)) for bucket in ray.get(list(bucket_refs))
                 for name, *packed in bucket]
        fetched = time.perf_counter()
        self.engine.sync_weights(named)
        return {"fetch_s": fetched - start, "load_s": time.perf_counter() - fetched}

    def sync_adapter(self, adapter_dir: str) -> None:
        self.engine.sync_adapter(adapter_dir)

    def logprobs(self, requests, completions) -> list[list[float]]:
        return self.engine.logprobs(requests, completions)

    def verify_sync(self, expected_logprobs, probe, tol: float) -> float:
        return self.engine.verify_sync(expected_logprobs, probe, tol)

    def health(self) -> dict:
        from actors.placement import actor_placement

        return {"pid": os.getpid(), "placement": actor_placement(), **self.engine.health()}


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


# What a call to a lost actor raises (process exited or was killed, node gone); ActorDiedError
# and ActorUnavailableError subclass it. Errors the engine itself raises are not in it.
ACTOR_LOST = (ray.exceptions.RayActorError,)


@dataclass(frozen=True)
class EngineReplacement:
    """One lost engine actor that the pool replaced: which, why, during what, and the seconds
    from noticing the loss to the re-run slice's result (the step's time lost to it).
    ``missed_deadline``: it did not die but stopped answering (killed by the pool)."""

    engine: int
    cause: str
    method: str
    seconds: float
    missed_deadline: bool = False


def replacement_metrics(events: Sequence[EngineReplacement], step: int) -> dict[str, float]:
    """A step's ``health/engine_replacements`` and ``health/engine_deadline_misses`` (counts, 0
    on a normal step, so the chart is continuous) and ``perf/engine_replacement_s`` (seconds
    lost to them); one line per event."""
    for e in events:
        print(f"[rl] step {step}: engine {e.engine} replaced ({e.cause} during {e.method}), "
              f"{e.seconds:.1f}s lost", flush=True)
    return {"health/engine_replacements": float(len(events)),
            "health/engine_deadline_misses": float(sum(e.missed_deadline for e in events)),
            "perf/engine_replacement_s": float(sum(e.seconds for e in events))}


def _why(err: BaseException) -> str:
    return str(err) if isinstance(err, DeadlineMissed) else type(err).__name__


class EngineLostError(NLAError):
    """An engine actor kept dying: the pool replaced it as often as allowed and gave up."""


def check_cluster_fits(num_engines: int, num_cpus_per_engine: float, num_gpus_per_engine: float) -> None:
    """Raise :class:`PlacementError` when the cluster's total CPUs/GPUs cannot hold the engines
    (Ray would otherwise queue the actors forever and the pool's start-up would hang)."""
    have = ray.cluster_resources()
    fixes = {"CPU": "engine.num_engines or learner.num_cpus_per_rank (the CPUs of each engine)",
             "GPU": "engine.num_engines or engine.tensor_parallel_size (the GPUs of each engine)"}
    for key, per_engine in (("CPU", num_cpus_per_engine), ("GPU", num_gpus_per_engine)):
        need, total = num_engines * per_engine, have.get(key, 0.0)
        if need > total + 1e-9:
            raise PlacementError(
                f"rollout engines: {num_engines} engine(s) × {per_engine:g} {key} need {need:g} {key}, "
                f"the Ray cluster has {total:g} {key}. Lower {fixes[key]}, or start a bigger cluster "
                f"(ray start --num-cpus/--num-gpus, or more nodes)")


def check_engine_fits_a_node(num_cpus_per_engine: float, num_gpus_per_engine: float) -> None:
    """Raise :class:`PlacementError` when no single node can hold one engine actor (an actor
    never spans nodes: Ray would queue it forever though the cluster's total suffices)."""
    from actors.placement import check_nodes_hold

    engine = {k: v for k, v in (("CPU", num_cpus_per_engine), ("GPU", num_gpus_per_engine)) if v > 0}
    if engine:
        check_nodes_hold([engine], what="rollout engines (one actor each)",
                         fix="learner.num_cpus_per_rank (the CPUs of each engine) or "
                             "engine.tensor_parallel_size (the GPUs of each engine)")


def engine_strategies(num_engines: int, num_cpus_per_engine: float, num_gpus_per_engine: float,
                      placement_group=None, bundle_indices: Sequence[int] | None = None) -> list:
    """Each engine's Ray scheduling strategy: None (anywhere the cluster fits, which is checked
    here) or its bundle of ``placement_group`` (checked to exist and to hold one engine)."""
    if placement_group is None:
        check_cluster_fits(num_engines, num_cpus_per_engine, num_gpus_per_engine)
        check_engine_fits_a_node(num_cpus_per_engine, num_gpus_per_engine)
        return [None] * num_engines
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.placement import check_bundles_hold

    bundles = check_bundles_hold(
        placement_group, range(num_engines) if bundle_indices is None else bundle_indices,
        count=num_engines, num_cpus=num_cpus_per_engine, num_gpus=num_gpus_per_engine,
        what="rollout engines")
    return [PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=b)
            for b in bundles]


class RolloutPool:
    """Several :class:`RolloutActor` s: a batch is split into contiguous slices (one per actor),
    results come back in request order; weight syncs and verification go to every actor.

    An actor that dies, or that does not answer a call within ``deadline``
    (:class:`actors.deadline.CallDeadline`, from the recipe's ``run.call_timeout_*``; it is then
    killed), is replaced (same options, latest weights/adapter re-applied) and only its slice
    re-run with the same seeds, so the results equal those it would have produced; after
    ``max_replacements`` failed tries for one call, :class:`EngineLostError`.

    ``placement_group``: one reserved by the caller (e.g. shared with the learners, see
    :mod:`actors.placement`); engine i — and any replacement of it — goes into its bundle
    ``bundle_indices[i]`` (default i), asking ``num_*_per_engine`` of it. The reservation already
    proved the cluster holds it, so only the bundles are checked; the caller releases the group.
    """

    actor_body = RolloutActor  # what each Ray actor runs (a test swaps in one that stalls)

    def __init__(self, spec: EngineSpec, *, num_engines: int = 1,
                 num_cpus_per_engine: float = 1.0, num_gpus_per_engine: float = 0.0,
                 omp_binds: Sequence[str] | None = None, num_threads: int = 1,
                 max_replacements: int = 2, placement_group=None,
                 bundle_indices: Sequence[int] | None = None, deadline: CallDeadline | None = None):
        self._strategies = engine_strategies(num_engines, num_cpus_per_engine, num_gpus_per_engine,
                                             placement_group, bundle_indices)
        self._binds = list(omp_binds) if omp_binds is not None else core_binds(num_engines)
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_engine,
                                     num_gpus=num_gpus_per_engine)(self.actor_body)
        self._build = (spec, num_threads, current_actor_logs())
        self.max_replacements = max_replacements
        self.deadline = deadline or CallDeadline.from_run()
        self._weights_refs = None  # the last sync_weights buckets (kept in the object store)
        self.last_sync: dict[str, float] = {}  # the last sync_weights' seconds, by phase
        self._adapter_dir: str | None = None  # the last adapter synced
        self.replacements: list[EngineReplacement] = []  # since the last drain_replacements()
        self.call_seconds: list[float] = []  # answered calls' durations, since heartbeat()
        started = time.perf_counter()
        self.actors = [self._start_actor(i) for i in range(num_engines)]
        self._wait_started(started)
        self.deadline.observe(time.perf_counter() - started, "engine start")  # bounds replacements

    # -- actor lifecycle
    def _wait_started(self, launched: float) -> None:
        """Every engine answers its first call (start-up errors surface here) within the
        deadline: an engine that never starts (no resources, a hung model load) is named."""
        futures = [a.health.remote() for a in self.actors]
        for index, future in enumerate(futures):
            try:
                self._get(future, "engine start", launched)
            except DeadlineMissed as err:
                self.shutdown()
                raise EngineLostError(
                    f"rollout engine actor {index} did not start: {err}. Check the engine's log "
                    "(<run>/logs/engine.log, or --verbose) for where it stopped (waiting for "
                    "resources, loading the model); if loading is merely slow, raise "
                    "run.call_timeout_floor_s") from None

    def _start_actor(self, index: int):
        spec, num_threads, logs = self._build
        actor_cls = self._actor_cls
        if self._strategies[index] is not None:  # the same bundle as the actor it replaces
            actor_cls = actor_cls.options(scheduling_strategy=self._strategies[index])
        return actor_cls.remote(spec, omp_bind=self._binds[index],
                                num_threads=num_threads, logs=logs)

    def _replace_actor(self, index: int, cause: BaseException) -> None:
        """A fresh actor at ``index`` serving the latest weights (raises ACTOR_LOST if it dies
        too, :class:`DeadlineMissed` if it does not start in time)."""
        try:  # an unavailable (or hung) actor may still hold resources
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        print(f"rollout pool: engine actor {index} lost ({_why(cause)}); starting a replacement",
              flush=True)
        actor = self._start_actor(index)
        self.actors[index] = actor
        self._get(actor.health.remote(), "engine start", time.perf_counter())
        if self._weights_refs is not None:
            self._get(actor.sync_weights.remote(self._weights_refs), "sync_weights", time.perf_counter())
        if self._adapter_dir is not None:
            self._get(actor.sync_adapter.remote(self._adapter_dir), "sync_adapter", time.perf_counter())

    def _get(self, future, phase: str, launched: float):
        """``ray.get(future)`` within ``phase``'s deadline counted from ``launched``."""
        limit = self.deadline.seconds(phase)
        try:
            result = ray.get(future, timeout=max(0.0, launched + limit - time.perf_counter()))
        except ray.exceptions.GetTimeoutError:
            raise DeadlineMissed(phase, limit) from None
        seconds = time.perf_counter() - launched
        self.deadline.observe(seconds, phase)
        self.call_seconds.append(seconds)
        return result

    def _call(self, calls: list[tuple[int, str, tuple]]) -> list:
        """Run ``(actor index, method, args)`` calls in parallel; results in order. A call whose
        actor died or missed its deadline is re-run on a replacement, at most
        ``max_replacements`` times."""
        launched = time.perf_counter()
        futures = [getattr(self.actors[i], method).remote(*args) for i, method, args in calls]
        return [self._result(i, method, args, future, launched)
                for (i, method, args), future in zip(calls, futures)]

    def _result(self, index: int, method: str, args: tuple, future, launched: float):
        cause, lost_at = None, None
        for attempt in range(self.max_replacements + 1):
            try:
                if attempt:
                    self._replace_actor(index, cause)
                    future = getattr(self.actors[index], method).remote(*args)
                    launched = time.perf_counter()
                result = self._get(future, method, launched)
                if lost_at is not None:
                    self.replacements.append(EngineReplacement(
                        index, _why(cause), method, time.perf_counter() - lost_at,
                        missed_deadline=isinstance(cause, DeadlineMissed)))
                return result
            except (*ACTOR_LOST, DeadlineMissed) as err:
                cause = err
                lost_at = lost_at if lost_at is not None else time.perf_counter()
        hung = isinstance(cause, DeadlineMissed)
        raise EngineLostError(
            f"rollout engine actor {index} {'stopped answering' if hung else 'died'} during "
            f"{method} and its {self.max_replacements} replacement(s) failed too; last cause: "
            f"{cause}. Check the engine's log (out of memory, model_dir not readable from every "
            "node, a crashed node) and the cluster's health"
            + ("; if generation is merely slow, raise run.call_timeout_floor_s" if hung else "")
        ) from cause

    def _broadcast(self, method: str, *args) -> list:
        return self._call([(i, method, args) for i in range(len(self.actors))])

    def _scatter(self, method: str, requests: list, shared_args) -> list:
        """``method`` on contiguous slices of ``requests``; ``shared_args(lo, hi)`` gives the rest."""
        ranges = [(lo, hi) for lo, hi in split_evenly(len(requests), len(self.actors)) if hi > lo]
        calls = [(i, method, (requests[lo:hi], *shared_args(lo, hi))) for i, (lo, hi) in enumerate(ranges)]
        return [row for part in self._call(calls) for row in part]

    # -- engine calls
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[list[Sample]]:
        """Request ``i`` is seeded ``sampling.seed + i`` whichever actor serves it."""
        return self._scatter("generate", list(requests), lambda lo, hi: (sampling.shifted(lo),))

    def logprobs(self, requests: Sequence[RolloutRequest],
                 completions: Sequence[Sequence[int]]) -> list[list[float]]:
        """Per-token log-probs of ``completions[i]`` after ``requests[i]``, spread over the actors."""
        completions = list(completions)
        return self._scatter("logprobs", list(requests), lambda lo, hi: (completions[lo:hi],))

    def sync_weights(self, named_tensors: Iterable, bucket_bytes: int = SYNC_BUCKET_BYTES) -> None:
        """Put the weights (Hugging Face names) into the object store once, as packed buckets,
        and have every actor load them; the buckets are kept for a replacement actor.
        ``last_sync``: seconds to put them, and the slowest actor's fetch and load."""
        started = time.perf_counter()
        self._weights_refs = None  # the stale weights leave the object store before the new arrive
        self._weights_refs = [ray.put([(name, *pack_tensor(t)) for name, t in bucket])
                              for bucket in weight_buckets(named_tensors, bucket_bytes)]
        put = time.perf_counter()
        loads = self._broadcast("sync_weights", self._weights_refs)
        self.last_sync = {"put_s": put - started,
                          **{key: max(load[key] for load in loads) for key in ("fetch_s", "load_s")}}

    def sync_adapter(self, adapter_dir: str) -> None:
        """``adapter_dir`` is read again when an actor is replaced: keep it (overwrite it in place)."""
        self._adapter_dir = str(adapter_dir)
        self._broadcast("sync_adapter", self._adapter_dir)

    def verify_sync(self, expected_logprobs, probe, tol: float = 1e-3) -> float:
        """Max |Δ| over every actor; raises (the first actor's error) if any sync did not apply."""
        return max(self._broadcast("verify_sync", expected_logprobs, probe, tol))

    def drain_replacements(self) -> list[EngineReplacement]:
        """The replacements since the last call (the coordinator logs them once per step)."""
        out, self.replacements = self.replacements, []
        return out

    def heartbeat(self) -> dict[str, float]:
        """``health/engine_last_call_s``: the longest engine call answered since the last
        heartbeat (0 when none); ``health/engine_deadline_s``: how long a generate may take now."""
        seconds, self.call_seconds = self.call_seconds, []
        return {"health/engine_last_call_s": max(seconds, default=0.0),
                "health/engine_deadline_s": self.deadline.seconds("generate")}

    def health(self) -> list[dict]:
        return self._broadcast("health")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def pool_from_recipe(cfg, *, model_dir: str, marker, injection, max_model_len: int = 1024,
                     num_cpus_per_engine: float = 1.0, colocated=None,
                     deadline: CallDeadline | None = None) -> RolloutPool:
    """The rollout pool a recipe asks for (``cfg.engine``), serving ``model_dir`` with the run's
    resolved marker and :class:`nla_rl.roundtrip.InjectionSpec` (read from the sidecar);
    ``colocated``: the :class:`actors.placement.Colocated` group engine i shares with rank i;
    ``deadline``: the run's (default: from ``cfg.run``)."""
    import torch

    tensor_parallel = getattr(cfg.engine, "tensor_parallel_size", 1)
    spec = EngineSpec(kind=cfg.engine.kind, model_dir=str(model_dir), marker=marker,
                      injection=injection, kv_cache_gib=cfg.engine.kv_cache_gib,
                      gpu_memory_utilization=cfg.engine.gpu_memory_utilization,
                      lora_rank=cfg.learner.lora_rank, seed=cfg.rl_seed,
                      max_model_len=max_model_len, dtype=cfg.model.dtype,
                      tensor_parallel_size=tensor_parallel)
    deadline = deadline or CallDeadline.from_run(cfg.run)
    if colocated is not None:
        return RolloutPool(spec, num_engines=cfg.engine.num_engines,
                           deadline=deadline,
                           num_cpus_per_engine=colocated.num_cpus,
                           num_gpus_per_engine=colocated.num_gpus, placement_group=colocated.group,
                           bundle_indices=colocated.bundles(cfg.engine.num_engines))
    return RolloutPool(spec, num_engines=cfg.engine.num_engines,
                       deadline=deadline, num_cpus_per_engine=num_cpus_per_engine,
                       num_gpus_per_engine=float(tensor_parallel) if torch.cuda.is_available() else 0.0)
