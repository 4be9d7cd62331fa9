"""Distributed training backends of a learner rank, chosen by name (``learner.backend``).

A backend owns the sharded model, the optimiser and the LR schedule of one rank. The learner
(:mod:`actors.learner`) only calls this small surface, so adding a backend is adding one class:

* ``module``: what forward passes call (every rank takes part in every forward);
* ``backward(loss, last_micro=...)``: accumulate gradients of one micro-batch (the loss is already
  scaled so that the sum over micro-batches and ranks is the step's exact mean);
* ``step() -> StepOutcome``: clip, skip when non-finite, optimiser + scheduler step, zero grads;
* ``full_state_dict(trainable_only=False)``: every rank calls it; rank 0 gets the full CPU state
  dict, others ``{}`` (``trainable_only``: only the parameters that require gradients, e.g. a
  LoRA adapter, are gathered);
* ``save(dir)`` / ``load(dir)``: this rank's share of model + optimiser + scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimSpec:
    """What every backend needs to build the optimiser and schedule (an SFT or RL section)."""

    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    schedule: str
    grad_clip: float


@dataclass(frozen=True)
class StepOutcome:
    """One optimiser step: the pre-clip global gradient norm, whether it was skipped, the LR used."""

    grad_norm: float
    skipped: bool
    lr: float


def build_backend(name: str, model, optim: OptimSpec, *, blocks, device, zero_stage: int = 3,
                  mixed_precision: str | None = None, fill=None):
    """The backend ``name`` wrapping ``model`` (``blocks``: the decoder blocks to shard one by one;
    ``fill``: FSDP2 only, fills a meta-built model's shards once sharded — sharded loading)."""
    if name == "fsdp2":
        from actors.backends.fsdp2 import FSDP2Backend

        return FSDP2Backend(model, optim, blocks=blocks, device=device,
                            mixed_precision=mixed_precision, fill=fill)
    if fill is not None:  # ZeRO-3 partitions a whole model: it cannot start from meta weights
        raise ValueError(f"learner.backend={name}: sharded loading is FSDP2's only")
    if name == "deepspeed":
        from actors.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(model, optim, device=device, zero_stage=zero_stage,
                                mixed_precision=mixed_precision)
    raise ValueError(f"learner.backend: expected fsdp2 or deepspeed, found {name!r}")
