"""A learner group: N Ray actors forming one torch.distributed group that trains one model.

    group = LearnerGroup(spec, world_size=2, num_cpus_per_rank=0.5)
    stats = group.train_step({"explanations": [...], "vectors": v}, loss="ar_sft")
    preds = group.reconstruct(texts)                  # AR;  group.av_logprobs(...) for the AV
    state = group.full_state_dict()                   # gathered on rank 0
    group.shutdown()

Ranks are placed by a placement group (one bundle per rank) and join one process group (gloo on
CPU, NCCL on GPU) through a free port on rank 0's node. A sharded model needs *every rank in
every forward*, so each group method fans out to all ranks, with the rows split evenly across
them, and returns rank 0's answer. The backend (FSDP2 or DeepSpeed) is chosen by name, the loss
from :mod:`actors.losses` by name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from actors.backends import OptimSpec
from actors.deadline import CallDeadline
from actors.learner_models import ModelSpec
from nla_rl.errors import NLAError

RNG_FILE = "rng_rank{rank}.pt"
MODEL_FILE = "model.safetensors"


class LearnerError(NLAError):
    """A learner group was asked for something it cannot do with these inputs."""


START_PHASE = "start-up (placement, model load, rendezvous)"


class LearnerHungError(NLAError):
    """A learner rank did not answer within its deadline: the run is stopped (its ranks killed)."""


class LearnerLostError(NLAError):
    """A learner rank's process or node was lost: the run is stopped (a rank holds its shard of
    the weights and optimiser state, so it cannot be replaced inside a step like an engine)."""


# What a call of the group is doing, in the words of the error a hang raises.
LOSS_PHASES = {"grpo": "grpo update", "ar_sft": "ar step", "av_sft": "av step"}


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a rank needs to build its share of a learner (picklable, sent once)."""

    model: ModelSpec
    optim: OptimSpec
    backend: str = "fsdp2"
    zero_stage: int = 3
    micro_batch_size: int = 4
    # A token budget per micro-batch (rows × longest row); None = micro_batch_size rows in order.
    micro_batch_tokens: int | None = None
    seed: int = 0
    threads_per_rank: int = 1
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights (actors.ema) for reconstruct(ema=True)
    # FSDP2 over ≥ 2 ranks: each rank reads only its shard (actors.sharded_load); False: whole.
    sharded_load: bool = True


def raise_bad_input(err: BaseException, before=None) -> None:
    """A rank's :class:`NLAError` (bad input, a plan that cannot fit) is raised as itself, one
    clear line, rather than wrapped in Ray's remote traceback; ``before`` runs first (the
    group's shutdown: the other ranks may wait on the failed one in a collective)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, NLAError):
        if before is not None:
            before()
        raise cause.with_traceback(None) from None


def _all_reduce_sum(values: Sequence[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class LearnerRank:
    """Ray actor body: one rank of a learner group (see the module doc)."""

    def __init__(self, spec: LearnerSpec, rank: int, world_size: int, logs=None):
        from nla_rl.run_logs import redirect_process_output

        redirect_process_output(logs, f"learner_{spec.model.role}")  # before torch.distributed
        torch.set_num_threads(spec.threads_per_rank)
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port on its node."""
        from actors.placement import free_port, node_address

        return node_address(), free_port()

    def setup(self, address: str, port: int) -> None:
        """Join the process group, then build the tokenizer, the model and the backend."""
        import torch.distributed as dist

        from actors.backends import build_backend
        from actors.learner_models import decoder_blocks, load_tokenizer

        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size)
        spec = self.spec
        self.memory_plan = self._check_memory_plan()  # before a byte of the model is loaded
        self.tokenizer = load_tokenizer(spec.model)
        model, fill = self._build_model()
        if spec.model.role == "av" and self.memory_plan is not None:
            from nla_rl.logprobs import lean_head

            if lean_head(model) is None:  # the plan assumed lean log-probs: count full logits
                self.memory_plan = self._plan(lean_logprobs=False)
        self.reference = self._build_reference(model)
        precision = None if spec.model.dtype == "float32" else spec.model.dtype
        self.backend = build_backend(spec.backend, model, spec.optim,
                                     blocks=decoder_blocks(model), device=self.device,
                                     zero_stage=spec.zero_stage, mixed_precision=precision,
                                     fill=fill)
        self.ema = None
        if spec.ema_decay > 0:
            from actors.ema import WeightEMA, local_weight_tensors

            self.ema = WeightEMA(local_weight_tensors(self.backend.module), spec.ema_decay)
        torch.manual_seed(spec.seed + 1 + self.rank)  # each rank its own stream (dropout)

    def _whole_load_reason(self) -> str | None:
        """Why this group loads the whole model on every rank; None: each rank reads only its
        shards (:mod:`actors.sharded_load`). Cached: the plan and the loader must agree."""
        from actors.sharded_load import whole_load_reason

        if not hasattr(self, "whole_load"):
            spec = self.spec
            self.whole_load = whole_load_reason(
                backend=spec.backend, world_size=self.world_size, model_dir=spec.model.model_dir,
                trust_remote_code=spec.model.trust_remote_code, enabled=spec.sharded_load)
        return self.whole_load

    def _build_model(self):
        """``(model, fill)``: loaded whole (``fill`` None), or built on ``meta`` with the
        ``fill`` the FSDP2 backend calls once it has sharded it."""
        from actors.learner_models import build_empty_model, build_model

        if self._whole_load_reason() is not None:
            return build_model(self.spec.model, seed=self.spec.seed), None
        empty = build_empty_model(self.spec.model, seed=self.spec.seed)
        return empty.module, lambda module: self._fill(module, empty, "model")

    def _build_reference(self, model):
        """The frozen starting weights of a full fine-tune (the AV's KL reference, the AR's
        truth check), sharded like the model; None without one or with LoRA (its reference is
        the model with the adapter disabled). With sharded loading it is read from the
        checkpoint shard by shard too, not copied from a whole model."""
        from actors.learner_models import build_empty_model, freeze, frozen_copy

        spec = self.spec.model
        if not spec.with_reference or spec.lora.rank > 0:
            return None
        if self._whole_load_reason() is not None:
            return self._shard_frozen(frozen_copy(model))
        empty = build_empty_model(spec, seed=self.spec.seed)
        reference = self._shard_frozen(freeze(empty.module))
        self._fill(reference, empty, "reference")
        return reference

    def _fill(self, module, empty, what: str) -> None:
        from actors.sharded_load import fill_shards

        stats = fill_shards(module, device=self.device, locate=empty.locate,
                            source=self.spec.model.model_dir, expected=empty.expected)
        self.load_stats = {**getattr(self, "load_stats", {}), what: stats.as_dict()}

    def _plan(self, lean_logprobs: bool = True):
        """This rank's :class:`nla_rl.memory_plan.RankPlan`; None when the checkpoint's shape
        cannot be read (the model loader, next, reports what is wrong with it)."""
        from nla_rl.memory_plan import MemoryPlanError, plan_rank, read_shape

        spec, model = self.spec, self.spec.model
        try:
            shape = read_shape(model.model_dir)
        except MemoryPlanError:
            return None
        return plan_rank(
            shape, role=model.role, world_size=self.world_size,
            sharded_weights=spec.backend == "fsdp2" or spec.zero_stage == 3,
            compute_dtype=model.dtype, lora_rank=model.lora.rank,
            lora_targets=tuple(model.lora.target_modules), with_reference=model.with_reference,
            with_ema=spec.ema_decay > 0, gradient_checkpointing=model.gradient_checkpointing,
            lean_logprobs=lean_logprobs, sharded_load=self._whole_load_reason() is None)

    def _what(self) -> str:
        return f"the {self.spec.model.role.upper()} learner (rank {self.rank} of {self.world_size})"

    def _check_memory_plan(self):
        """:func:`nla_rl.memory_plan.check_static_fits` against this rank's device and host."""
        from nla_rl.memory_plan import check_static_fits, device_free_bytes, host_free_bytes

        ranks_on_host = self._ranks_on_this_host()  # a collective: every rank, before any return
        plan = self._plan()
        if plan is None:
            return None
        check_static_fits(plan, device_free=device_free_bytes(self.device),
                          host_free=host_free_bytes(), ranks_on_host=ranks_on_host,
                          what=self._what(), device=str(self.device))
        return plan

    def _ranks_on_this_host(self) -> int:
        """How many ranks of the group run on this rank's host: they all load the model (whole,
        or their shards) into host memory at the same time while the group starts (8 on an
        8-GPU node)."""
        import socket

        import torch.distributed as dist

        if not dist.is_initialized():  # a rank used on its own (no group): itself alone
            self.ranks_on_host = 1
            return 1
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        self.ranks_on_host = sum(h == hosts[self.rank] for h in hosts)
        return self.ranks_on_host

    def _check_micro_batch(self, micro) -> None:
        """A micro-batch whose activations cannot fit stops with one clear error, not an OOM."""
        from nla_rl.memory_plan import check_step_fits, device_free_bytes

        if self.memory_plan is None:
            return
        rows, length = micro.attention_mask.shape
        check_step_fits(self.memory_plan, tokens=int(rows * length), rows=int(rows),
                        device_free=device_free_bytes(self.device), what=self._what(),
                        device=str(self.device), micro_batch_tokens=self.spec.micro_batch_tokens,
                        checkpointing=self.spec.model.gradient_checkpointing)

    def _shard_frozen(self, model):
        if self.spec.backend != "fsdp2":  # DeepSpeed: the frozen reference stays replicated
            return model.to(self.device)
        from actors.backends.fsdp2 import shard
        from actors.learner_models import decoder_blocks

        return shard(model, blocks=decoder_blocks(model), device=self.device)

    # ------------------------------------------------------------------------------ training
    def train_step(self, rows: dict, loss_name: str) -> dict:
        """Micro-batched forward/backward of this rank's rows, then one (guarded) optimiser step.

        Each micro-batch's summed loss is scaled by ``world_size / N_global`` (gradients are
        averaged over ranks), so the accumulated gradient is that of the exact step mean. The
        loss's statistics (``loss_stats``) are weighted sums over micro-batches and ranks, divided
        once; ``compute_s`` is this rank's wall time in forward, backward and optimiser step.
        """
        from actors.losses import add_stats, get_loss, stat_means, stat_vector

        loss = get_loss(loss_name, self.spec.model.role)
        model = self.backend.module
        model.train()
        micros = self._micro_batches(loss.build(self, rows))
        local_count = sum(loss.count(m) for m in micros)
        local_tokens = sum(int(m.attention_mask.sum()) for m in micros)
        total, = _all_reduce_sum([local_count], self.device)
        summed, stats = torch.zeros((), dtype=torch.float64), {}
        started = time.perf_counter()
        for i, micro in enumerate(micros):
            self._check_micro_batch(micro)
            out = loss.compute(self, model, micro.to(self.device))
            self.backend.backward(out.loss_sum * (self.world_size / total),
                                  last_micro=i == len(micros) - 1)
            summed += out.loss_sum.detach().to("cpu", torch.float64)
            stats = add_stats(stats, out.stats)
        outcome = self.backend.step()
        if self.ema is not None and not outcome.skipped:
            from actors.ema import local_weight_tensors

            self.ema.update(local_weight_tensors(self.backend.module))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - started
        loss_sum, tokens, *stat_sums = _all_reduce_sum(
            [summed, local_tokens, *stat_vector(loss.stats, stats)], self.device)
        return {"loss": loss_sum / total, "grad_norm": outcome.grad_norm,
                "skipped": float(outcome.skipped), "lr": outcome.lr, "count": total,
                "tokens": tokens, "compute_s": compute_s,
                "loss_stats": stat_means(loss.stats, stat_sums)}

    @torch.no_grad()
    def evaluate(self, rows: dict, loss_name: str) -> dict:
        """The loss's global mean over ``rows`` (no gradients, no step)."""
        from actors.losses import get_loss

        loss = get_loss(loss_name, self.spec.model.role)
        model = self.backend.module
        model.eval()
        summed, count = 0.0, 0
        for micro in self._micro_batches(loss.build(self, rows)):
            out = loss.compute(self, model, micro.to(self.device))
            summed, count = summed + float(out.loss_sum), count + out.count
        summed, count = _all_reduce_sum([summed, count], self.device)
        return {"loss": summed / count, "count": count}

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def av_logprobs(self, prompts: list, completions: list, vectors, reference: bool,
                    temperature: float = 1.0) -> list:
        """Per-token log-probs of ``completions`` (injection at each prompt's marker); with
        ``reference`` the frozen policy (LoRA: the same model with its adapter disabled)."""
        import contextlib

        from actors.losses import completion_logprobs

        spec = self.spec.model
        model, context = self.backend.module, contextlib.nullcontext()
        if reference and self.reference is not None:
            model = self.reference
        elif reference and spec.lora.rank > 0:
            context = model.disable_adapter()
        elif reference:
            raise LearnerError("no reference policy: build the AV learner with with_reference=True")
        model.eval()
        # A copy: Ray hands over read-only arrays, which torch warns about (and must not write).
        vectors = torch.tensor(np.asarray(vectors), dtype=torch.float32)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = [None] * len(prompts)
        with context:
            for rows in self._logprob_groups(prompts, completions):
                parts = completion_logprobs(model, [prompts[r] for r in rows],
                                            [completions[r] for r in rows], vectors[rows],
                                            marker=spec.marker, injection=spec.injection,
                                            pad_id=pad, device=self.device,
                                            temperature=temperature)
                for r, part in zip(rows, parts):
                    out[r] = part
        return out

    def _micro_batches(self, batch) -> list:
        """``micro_batch_size`` rows in order, or the token budget's groups
        (:func:`nla_rl.sft.micro_batches`), as many on every rank."""
        from nla_rl.sft import micro_batches, token_budget_groups

        tokens, count = self.spec.micro_batch_tokens, 1
        if tokens is not None:
            count = self._agreed_count(len(token_budget_groups(
                batch.attention_mask.sum(dim=1).tolist(), tokens)))
        return list(micro_batches(batch, self.spec.micro_batch_size, tokens, count))

    def _logprob_groups(self, prompts: list, completions: list) -> list[list[int]]:
        """Row groups of one forward each: ``micro_batch_size`` rows in order, or the token
        budget's groups (:func:`nla_rl.sft.token_budget_groups`), as many on every rank."""
        from nla_rl.sft import token_budget_groups

        tokens = self.spec.micro_batch_tokens
        if tokens is not None:
            lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
            count = self._agreed_count(len(token_budget_groups(lengths, tokens)))
            return token_budget_groups(lengths, tokens, count)
        size = self.spec.micro_batch_size
        return [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]

    def _agreed_count(self, count: int) -> int:
        """The most micro-batches any rank has: every rank must run as many forwards (a sharded
        model gathers its weights in each; a rank with one forward fewer deadlocks the others)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    @torch.no_grad()
    def reconstruct(self, texts: list[str], ema: bool = False,
                    reference: bool = False) -> torch.Tensor:
        """The AR's predictions; with ``ema`` those of the weights' moving average, with
        ``reference`` those of the frozen starting AR (a learner built with_reference)."""
        import contextlib

        if reference:
            if self.reference is None:
                raise LearnerError("reconstruct(reference=True) needs an AR learner built with "
                                   "with_reference=True")
            return self.reference.reconstruct(self.tokenizer, texts,
                                              template=self.spec.model.ar_template,
                                              batch_size=self.spec.micro_batch_size)
        model = self.backend.module
        model.eval()
        if ema and self.ema is None:
            raise LearnerError("reconstruct(ema=True) needs a learner built with ema_decay > 0")
        context = self.ema.swapped_in(model) if ema else contextlib.nullcontext()
        with context:
            return model.reconstruct(self.tokenizer, texts, template=self.spec.model.ar_template,
                                     batch_size=self.spec.micro_batch_size)

    # ---------------------------------------------------------------------------------- state
    def full_state_dict(self, trainable_only: bool = False) -> dict:
        return self.backend.full_state_dict(trainable_only)

    def save_state(self, directory: str) -> None:
        """This rank's share: backend state (model + optimiser + scheduler) and its RNG state."""
        from nla_rl.checkpoint import capture_rng_state

        self.backend.save(Path(directory))
        torch.save(capture_rng_state(), Path(directory) / RNG_FILE.format(rank=self.rank))
        if self.ema is not None:
            self.ema.save(Path(directory), self.rank)

    def load_state(self, directory: str) -> None:
        from nla_rl.checkpoint import restore_rng_state

        self.backend.load(Path(directory))
        path = Path(directory) / RNG_FILE.format(rank=self.rank)
        restore_rng_state(torch.load(path, weights_only=True))
        if self.ema is not None:
            self.ema.load(Path(directory), self.rank)

    def ping(self) -> int:
        return self.rank

    def placement(self) -> dict:
        """This rank's node, placement group and assigned resources, how many ranks of its
        group share its host (what the memory plan's host check counted), and how it loaded its
        model: ``load`` "sharded" or "whole: <why>", ``loaded`` what it read, by model."""
        from actors.placement import actor_placement

        whole = getattr(self, "whole_load", None)
        return {"rank": self.rank, "ranks_on_host": getattr(self, "ranks_on_host", None),
                "load": "sharded" if whole is None else f"whole: {whole}",
                "loaded": getattr(self, "load_stats", {}), **actor_placement()}


def split_rows(rows: dict, parts: int) -> list[dict]:
    """``rows`` (columns of equal length) cut into ``parts`` equal contiguous shares.

    Columns that are not per-row (scalars such as ``shuffle_seed``) go to every share.
    """
    lengths = {k: len(v) for k, v in rows.items() if hasattr(v, "__len__") and not isinstance(v, str)}
    if len(set(lengths.values())) != 1:
        raise LearnerError(f"rows: every column needs the same number of rows, found {lengths}")
    n = next(iter(lengths.values()))
    if n == 0 or n % parts:
        raise LearnerError(f"{n} rows cannot be split evenly over {parts} ranks; use a batch "
                           f"size that is a multiple of the number of ranks")
    share = n // parts
    return [{k: (v[r * share:(r + 1) * share] if k in lengths else v) for k, v in rows.items()}
            for r in range(parts)]


def _pad_to_multiple(items: list, multiple: int) -> tuple[list, int]:
    """``items`` repeated at the end up to a multiple of ``multiple``; returns (padded, n real)."""
    n = len(items)
    extra = (-n) % multiple
    return items + [items[i % n] for i in range(extra)], n


class LearnerGroup:
    """Driver-side handle of N learner ranks (see the module doc)."""

    rank_body = LearnerRank  # what each Ray actor runs (a test swaps in one that stalls)

    def __init__(self, spec: LearnerSpec, *, world_size: int, num_cpus_per_rank: float = 1.0,
                 num_gpus_per_rank: float = 0.0, name: str = "learner", checkpoints=None,
                 placement_group=None, bundle_indices: Sequence[int] | None = None,
                 deadline: CallDeadline | None = None):
        """``checkpoints``: a :class:`nla_rl.checkpoint.CheckpointManager` for :meth:`save` /
        :meth:`load` (its root must be reachable by every rank). ``placement_group``: one
        reserved by the caller (e.g. shared with the engines, :mod:`actors.placement`); rank r
        goes into its bundle ``bundle_indices[r]`` (default r) asking ``num_*_per_rank`` of it,
        and the group stays the caller's to release. Without it the group reserves its own.
        ``deadline``: how long a call may take (the run's, from ``run.call_timeout_*``); a rank
        that does not answer in time stops the group with :class:`LearnerHungError`."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.cluster import current_actor_logs
        from actors.placement import check_bundles_hold, reserve

        if spec.ema_decay > 0 and spec.backend == "deepspeed" and spec.zero_stage == 3:
            # ZeRO-3 keeps small parameters gathered and caches others between forwards, so a
            # partition swapped for the EMA does not reliably reach the forward pass.
            raise LearnerError("an EMA scorer (rl.ar_ema_decay > 0) needs learner.backend=fsdp2 "
                               "or learner.zero_stage=2 with DeepSpeed; ZeRO-3 is not supported")
        self.spec, self.world_size, self.name = spec, world_size, name
        self.checkpoints = checkpoints
        self.deadline = deadline or CallDeadline.from_run()
        if placement_group is None:
            self.placement, self._owns_placement = reserve(
                world_size, num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank), True
            bundles = list(range(world_size))
        else:
            bundles = check_bundles_hold(
                placement_group, range(world_size) if bundle_indices is None else bundle_indices,
                count=world_size, num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                what=f"learner group {name}")
            self.placement, self._owns_placement = placement_group, False
        threads = str(spec.threads_per_rank)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "false"}
        actor = ray.remote(self.rank_body)
        try:
            self.ranks = [
                actor.options(
                    num_cpus=num_cpus_per_rank, num_gpus=num_gpus_per_rank,
                    name=None, runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.placement, placement_group_bundle_index=bundles[r]),
                ).remote(spec, r, world_size, current_actor_logs())
                for r in range(world_size)
            ]
            # Start-up is bounded like every call (the floor alone: nothing is timed yet), so
            # a rank that never gets its resources or hangs loading its model is named.
            [(address, port)] = self._gather([self.ranks[0].rendezvous.remote()], START_PHASE)
            self._all("setup", address, port, phase=START_PHASE)
        except BaseException as err:
            self.shutdown()
            raise_bad_input(err)
            raise

    # ------------------------------------------------------------------------------- fan-out
    def _all(self, method: str, *args, phase: str, per_rank: list | None = None) -> list:
        """Call ``method`` on every rank (``per_rank[r]`` prepended to rank r's args), within
        the deadline of ``phase`` (:meth:`_gather`)."""
        refs = [getattr(rank, method).remote(*((per_rank[r],) if per_rank else ()), *args)
                for r, rank in enumerate(self.ranks)]
        return self._gather(refs, phase)

    def _gather(self, refs: list, phase: str) -> list:
        """Every rank's answer, in rank order. A rank's own error is raised as soon as it
        arrives (the others may wait on it in a collective); ranks still silent when ``phase``'s
        deadline passes stop the group with :class:`LearnerHungError`."""
        import ray

        started = time.perf_counter()
        limit = self.deadline.seconds(phase)
        index = {ref: r for r, ref in enumerate(refs)}
        out, pending = [None] * len(refs), list(refs)
        while pending:
            left = max(0.0, started + limit - time.perf_counter())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise self._hung([index[ref] for ref in pending], phase, limit)
            try:
                out[index[ready[0]]] = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:  # its process died, or its node
                raise self._lost(index[ready[0]], phase, err) from None
            except ray.exceptions.RayTaskError as err:
                raise_bad_input(err, self.shutdown)
                raise
        self.deadline.observe(time.perf_counter() - started, phase)
        return out

    def _hung(self, silent: list[int], phase: str, limit: float) -> LearnerHungError:
        """The one error of a hang: which rank(s), doing what, where to resume from. The ranks
        are killed first (a hung rank holds its devices and its peers)."""
        self.shutdown()
        def ranks(which: list[int]) -> str:
            return f"rank{'s' * (len(which) > 1)} {', '.join(map(str, which))}"

        if len(silent) < self.world_size:
            answered = sorted(set(range(self.world_size)) - set(silent))
            who = f"{ranks(silent)} did not answer ({ranks(answered)} did)"
        else:  # one stuck rank holds the others in a collective: no rank can be singled out
            who = (f"none of ranks 0-{self.world_size - 1} answered (a rank stuck before a "
                   "collective holds the others in it)" if self.world_size > 1
                   else "rank 0 did not answer")
        return LearnerHungError(
            f"learner {self.name}: {who} within {limit:.3g}s during {phase}; the run is stopped. "
            f"Last completed checkpoint: {self._last_checkpoint()}. See the rank's log "
            f"(<run>/logs/learner_{self.spec.model.role}.log, or --verbose) for where it stopped "
            "(a stuck collective, a lost GPU, a full disk); if the call is merely slow, raise "
            "run.call_timeout_floor_s or run.call_timeout_factor, then resume with run.resume=true")

    def _lost(self, rank: int, phase: str, err: BaseException) -> LearnerLostError:
        """The one error of a lost rank: which, doing what, why (Ray's cause in a few words),
        where to resume from. The surviving ranks are killed first (they would wait on the
        lost one in their next collective)."""
        self.shutdown()
        text = str(err)
        if "node has died" in text or "node was terminated" in text:
            why = "its node died"
        elif "creation task" in text:  # its constructor raised: Ray's text says what
            why = f"it failed to start ({text.strip().splitlines()[-1][:300]})"
        else:
            why = f"its process died ({type(err).__name__})"
        return LearnerLostError(
            f"learner {self.name}: rank {rank} of {self.world_size} was lost during {phase}: "
            f"{why}; the run is stopped. Last completed checkpoint: {self._last_checkpoint()}. "
            "A rank cannot be replaced mid-run (its shard of the weights and optimiser state "
            "went with it): check the cluster (ray status) and the rank's log "
            f"(<run>/logs/learner_{self.spec.model.role}.log), then resume with "
            "run.resume=true")

    def _last_checkpoint(self) -> str:
        if self.checkpoints is None:
            return "none (this group keeps no checkpoints)"
        try:
            path = self.checkpoints.latest_valid()
        except Exception as err:  # a refused checkpoint: say so, the hang is the news here
            return f"unknown ({err})"
        return str(path) if path is not None else f"none yet in {self.checkpoints.root}"

    def train_step(self, rows: dict, *, loss: str) -> dict:
        """One optimiser step on ``rows`` (split evenly over the ranks); rank 0's global stats."""
        return self._all("train_step", loss, phase=LOSS_PHASES.get(loss, f"{loss} step"),
                         per_rank=split_rows(rows, self.world_size))[0]

    def evaluate(self, rows: dict, *, loss: str) -> dict:
        """The global mean of ``loss`` over ``rows``, without gradients."""
        return self._all("evaluate", loss, phase=f"{loss} eval",
                         per_rank=split_rows(rows, self.world_size))[0]

    def av_logprobs(self, prompts: list[list[int]], completions: list[list[int]], vectors, *,
                    reference: bool = False, temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token log-probs (after ``temperature``) of each completion given its prompt with
        ``vectors[b]`` injected; ``reference``: the frozen policy's."""
        vectors = list(np.asarray(vectors, dtype=np.float32))
        triples, n = _pad_to_multiple(list(zip(prompts, completions, vectors)), self.world_size)
        shares = split_rows({"p": [t[0] for t in triples], "c": [t[1] for t in triples],
                             "v": np.stack([t[2] for t in triples])}, self.world_size)
        refs = [rank.av_logprobs.remote(s["p"], s["c"], s["v"], reference, temperature)
                for rank, s in zip(self.ranks, shares)]
        parts = self._gather(refs, "reference log-probs" if reference else "log-probs")
        return [lp for part in parts for lp in part][:n]

    def reconstruct(self, texts: list[str], *, ema: bool = False,
                    reference: bool = False) -> torch.Tensor:
        """The AR's predictions [len(texts), d] (fp32, CPU); ``ema``: with the weights' moving
        average (a group built with ``spec.ema_decay > 0``); ``reference``: with the frozen
        starting AR (a group built with ``spec.model.with_reference``)."""
        padded, n = _pad_to_multiple(list(texts), self.world_size)
        shares = split_rows({"t": padded}, self.world_size)
        parts = self._all("reconstruct", ema, reference, phase="reconstruct",
                          per_rank=[s["t"] for s in shares])
        return torch.cat(parts)[:n]

    def placements(self) -> list[dict]:
        """Each rank's node, placement group and assigned resources (rank order)."""
        return self._all("placement", phase="placement")

    def full_state_dict(self, *, phase: str = "gather weights") -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict on CPU; every rank takes part, rank 0 returns it.
        ``phase``: what the gather is for, as a hang's error names it."""
        return self._all("full_state_dict", phase=phase)[0]

    def trainable_state_dict(self, *, phase: str = "gather weights") -> dict[str, torch.Tensor]:
        """The parameters that require gradients (a LoRA run: the adapter), unsharded on CPU;
        nothing else is gathered."""
        return self._all("full_state_dict", True, phase=phase)[0]

    def save_state(self, directory: str | Path) -> None:
        """Every rank writes its share of model, optimiser, scheduler and RNG into ``directory``
        (a directory all ranks can reach: one node, or a shared file system)."""
        self._all("save_state", str(directory), phase="save checkpoint")

    def load_state(self, directory: str | Path) -> None:
        self._all("load_state", str(directory), phase="load checkpoint")

    def save(self, step: int, *, extra_files=None) -> Path:
        """Checkpoint ``step`` atomically: every rank's share (model, optimiser, scheduler, RNG),
        the gathered full weights as ``model.safetensors``, and ``extra_files(staging_dir)`` (the
        data cursor). A failure leaves the previous checkpoint as the latest."""
        from safetensors.torch import save_file

        def write(staging: Path) -> None:
            self.save_state(staging)
            full = self.full_state_dict(phase="save checkpoint")  # cloned: tied weights share storage
            save_file({k: v.contiguous().clone() for k, v in full.items()},
                      str(staging / MODEL_FILE))
            if extra_files is not None:
                extra_files(staging)

        return self._manager().save(step, write)

    def load(self) -> Path | None:
        """Restore the latest valid checkpoint (a damaged one is skipped with a warning, another
        recipe's refused); returns its directory, or None when there is none."""
        path = self._manager().latest_valid()
        if path is not None:
            self.load_state(path)
        return path

    def _manager(self):
        if self.checkpoints is None:
            raise LearnerError("this learner group was built without a CheckpointManager")
        return self.checkpoints

    def shutdown(self) -> None:
        """Kill the ranks and release their placement group if the group reserved it
        (a caller's shared one is left to the caller; idempotent)."""
        import ray

        from actors.placement import release

        for rank in getattr(self, "ranks", []):
            ray.kill(rank)
        self.ranks = []
        if getattr(self, "placement", None) is not None:
            if self._owns_placement:
                release(self.placement)
            self.placement = None
