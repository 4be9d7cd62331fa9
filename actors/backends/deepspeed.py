"""DeepSpeed backend: ZeRO stage 2 or 3 (``learner.zero_stage``), gloo on CPU, NCCL on GPU.

The learner marks the accumulation boundary itself (``set_gradient_accumulation_boundary`` before
each backward, True at the last micro-batch), so the number of micro-batches may vary per step;
``step`` then clips (``gradient_clipping``), checks the global norm and applies the update — ZeRO skips the step (and the scheduler step) when the norm
is not finite, so non-finite gradients never reach the weights. Gradients are averaged over ranks;
the learner scales the loss by the world size, so the result is the exact global mean.

Checkpoints use DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (each rank writes its
partition of the optimiser state; the scheduler state is included). The full state dict of a
ZeRO-3 model is gathered with ``GatheredParameters``.

Every rank loads the whole model before ``deepspeed.initialize`` partitions it (ZeRO-3 included):
the sharded loading of :mod:`actors.sharded_load` is FSDP2's only.

The first use in an environment JIT-compiles a shared-memory op (30-45 s on CPU); later starts
reuse the build cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from actors.backends import OptimSpec, StepOutcome
from nla_rl.optim import build_optimizer, build_scheduler

CHECKPOINT_TAG = "deepspeed"


def ds_config(optim: OptimSpec, *, zero_stage: int, mixed_precision: str | None) -> dict:
    """The DeepSpeed config of one learner (batch sizes are bookkeeping: the learner micro-batches)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": mixed_precision == "bfloat16"},
        "fp16": {"enabled": mixed_precision == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """One rank's DeepSpeed engine (see the module doc)."""

    def __init__(self, model: torch.nn.Module, optim: OptimSpec, *, device, zero_stage: int = 3,
                 mixed_precision: str | None = None):
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        model.to(device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, lr=optim.lr, weight_decay=optim.weight_decay)

        def scheduler(opt):
            return build_scheduler(opt, warmup_steps=optim.warmup_steps,
                                   total_steps=optim.total_steps, schedule=optim.schedule)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(optim, zero_stage=zero_stage, mixed_precision=mixed_precision))
        # Forward through the engine: ZeRO-3 counts micro-steps in engine.forward, and without
        # that count it overwrites (not adds) the gradients of earlier micro-batches.
        self.module = self.engine
        self.zero_stage = zero_stage

    def backward(self, loss: torch.Tensor, *, last_micro: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last_micro)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepOutcome:
        lr = float(self.scheduler.get_last_lr()[0])
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return StepOutcome(norm, not self.engine.was_step_applied(), lr)

    def full_state_dict(self, trainable_only: bool = False) -> dict:
        """Every rank must call this (ZeRO-3 gathers); rank 0 gets the full CPU state dict;
        ``trainable_only``: the parameters that require gradients, alone gathered."""
        import deepspeed

        module = self.engine.module
        named = [(n, p) for n, p in module.named_parameters()
                 if p.requires_grad or not trainable_only]
        params = [p for _, p in named] if self.zero_stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if dist.get_rank() != 0:
                return {}
            if trainable_only:
                return {k: v.detach().to("cpu", copy=True) for k, v in named}
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint {CHECKPOINT_TAG!r} in it")
