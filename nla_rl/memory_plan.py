"""What one learner rank needs in memory, read from a checkpoint's shapes before a byte is loaded.

A rank of W ranks holds (the backends keep fp32 master weights and compute in ``model.dtype``):

    weights      4·P / S            S = W when the weights are sharded (FSDP2, ZeRO-3), else 1
    reference    4·P / S            a full fine-tune's frozen copy (the AV's KL reference, the
                                    AR's truth check); none with LoRA
    ema          4·P / S            an EMA of the weights (the AR's scorer, rl.ar_ema_decay > 0)
    gradients    4·T / W            T trainable parameters (all, or the LoRA adapters')
    optimizer    16·T / W           AdamW's two fp32 moments (8·T/W) and the temporaries of its
                                    step (torch's foreach AdamW: bench/p7 measures 9·T/W at the
                                    Qwen2.5-0.5B shape; 8·T/W is counted)
    activations  n · c · L · (8·d + 4·i)     kept for the backward of a micro-batch of n tokens
                                    (c bytes per compute element, L blocks, width d, MLP width i);
                 n · c · (L·d + 8·d + 4·i)   with gradient checkpointing (block inputs + one block)
    logits       3 · 32 MiB                  lean log-probs (chunks of ``logprobs.CHUNK_BYTES``)
                 n · V · 4 · 3               on the full path (AV only; the AR has no LM head)

and, on the host while it loads: with sharded loading (FSDP2 over ≥ 2 ranks,
``learner.sharded_load``) its fp32 shard and one slice in flight, 4·P/W + 4·⌈R/W⌉·C for the
largest stored tensor of R rows of C values (each rank reads only its rows); else the whole fp32
model once (4·P: every rank reads the full checkpoint before sharding it). The activation row is the usual per-layer count of the tensors
a decoder block saves (norm inputs, q/k/v/o, the MLP's gate, up, activation and down inputs),
without attention scores (SDPA does not keep them); it is an estimate to catch a plan that cannot
fit, not an allocator model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nla_rl.errors import NLAError

GIB = 2**30
FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = 16  # per trainable parameter: AdamW's moments + its step's temporaries
LOGIT_CHUNK_COPIES = 3  # logits, their log-softmax and the backward's recompute of one chunk


class MemoryPlanError(NLAError):
    """A learner rank's plan does not fit the memory it has."""


@dataclass(frozen=True)
class ModelShape:
    """Counts read from a checkpoint directory's ``config.json`` and safetensors headers."""

    params: int
    d_model: int
    layers: int
    intermediate: int
    vocab: int
    linear_shapes: dict[str, tuple[int, int]]  # name → (out, in) of every 2-D weight
    largest_shape: tuple[int, ...] = ()  # the stored tensor with the most values

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        """Trainable parameters of a LoRA adapter of ``rank`` on the ``targets`` linears:
        ``r · (in + out)`` each."""
        total = 0
        for name, (out, inp) in self.linear_shapes.items():
            module = name.removesuffix(".weight").rsplit(".", 1)[-1]
            if module in targets:
                total += rank * (inp + out)
        return total


def read_shape(model_dir: str | Path) -> ModelShape:
    """The shape of the checkpoint in ``model_dir`` from its headers only (no weights read)."""
    from safetensors import safe_open

    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise MemoryPlanError(f"{root}: no *.safetensors file to read the model's shape from")
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        params, linears, largest = 0, {}, ()
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shape = [int(size) for size in handle.get_slice(name).get_shape()]
                    params += math.prod(shape)
                    if math.prod(shape) > math.prod(largest or (0,)):
                        largest = tuple(shape)
                    if len(shape) == 2 and name.endswith(".weight"):
                        linears[name] = (shape[0], shape[1])
        d = int(text["hidden_size"])
        return ModelShape(params=params, d_model=d, layers=int(text["num_hidden_layers"]),
                          intermediate=int(text.get("intermediate_size") or 4 * d),
                          vocab=int(text.get("vocab_size") or 0), linear_shapes=linears,
                          largest_shape=largest)
    except Exception as err:  # unreadable: the loader, which runs next, says what is wrong
        raise MemoryPlanError(f"{root}: cannot read the model's shape ({err})") from err


@dataclass(frozen=True)
class RankPlan:
    """Bytes one rank needs, by part (see the module docstring)."""

    weights: int
    reference: int
    ema: int
    gradients: int
    optimizer: int
    activations_per_token: int
    activations_fixed: int  # gradient checkpointing's one recomputed block, per token
    logits_per_token: int
    logits_fixed: int
    host_load: int
    sharded_load: bool = False  # host_load is a shard and a slice, not the whole model

    @property
    def static(self) -> int:
        """Bytes held from the first step on, whatever the micro-batch."""
        return self.weights + self.reference + self.ema + self.gradients + self.optimizer

    def step(self, tokens: int) -> int:
        """Bytes at the peak of a micro-batch of ``tokens`` tokens."""
        return (self.static + tokens * (self.activations_per_token + self.activations_fixed
                                        + self.logits_per_token) + self.logits_fixed)

    def parts(self, tokens: int) -> dict[str, int]:
        return {"weights": self.weights, "reference": self.reference, "ema": self.ema,
                "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": tokens * (self.activations_per_token + self.activations_fixed),
                "logits": tokens * self.logits_per_token + self.logits_fixed}


def plan_rank(shape: ModelShape, *, role: str, world_size: int, sharded_weights: bool,
              compute_dtype: str, lora_rank: int = 0, lora_targets: tuple[str, ...] = (),
              with_reference: bool = False, with_ema: bool = False,
              gradient_checkpointing: bool = False, lean_logprobs: bool = True,
              sharded_load: bool = False) -> RankPlan:
    """One rank's :class:`RankPlan` (the formulas of the module docstring)."""
    from nla_rl.logprobs import CHUNK_BYTES

    shards = world_size if sharded_weights else 1
    trainable = shape.lora_params(lora_rank, lora_targets) if lora_rank > 0 else shape.params
    c = DTYPE_BYTES[compute_dtype]
    d, i, layers = shape.d_model, shape.intermediate, shape.layers
    block = c * (8 * d + 4 * i)
    if gradient_checkpointing:
        per_token, fixed = c * layers * d, block
    else:
        per_token, fixed = layers * block, 0
    av = role == "av"
    return RankPlan(
        weights=FP32 * shape.params // shards,
        reference=FP32 * shape.params // shards if with_reference and lora_rank == 0 else 0,
        ema=FP32 * shape.params // shards if with_ema else 0,
        gradients=FP32 * trainable // world_size,
        optimizer=OPTIMIZER_BYTES * trainable // world_size,
        activations_per_token=per_token, activations_fixed=fixed,
        logits_per_token=0 if not av or lean_logprobs else LOGIT_CHUNK_COPIES * FP32 * shape.vocab,
        logits_fixed=LOGIT_CHUNK_COPIES * CHUNK_BYTES if av and lean_logprobs else 0,
        host_load=host_load_bytes(shape, world_size, sharded_load), sharded_load=sharded_load)


def host_load_bytes(shape: ModelShape, world_size: int, sharded_load: bool) -> int:
    """Host bytes one rank needs while it loads: the whole fp32 model, or with sharded loading
    its fp32 shard plus its rows of the largest tensor in flight (module docstring)."""
    if not sharded_load:
        return FP32 * shape.params
    rows, *rest = shape.largest_shape or (0,)
    return FP32 * shape.params // world_size + FP32 * -(-rows // world_size) * math.prod(rest)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_static_fits(plan: RankPlan, *, device_free: int, host_free: int, ranks_on_host: int,
                      what: str, device: str) -> None:
    """Refuse, before loading, a rank whose weights, gradients and optimizer state exceed the
    device memory free now, or whose load (the whole fp32 model per rank, or its shard with
    sharded loading) exceeds the host's."""
    if plan.static > device_free:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in plan.parts(0).items() if v and k not in
                          ("activations", "logits"))
        raise MemoryPlanError(
            f"{what}: each rank needs about {gib(plan.static)} before any activation ({parts}) "
            f"but {device} has {gib(device_free)} free. Train a LoRA (learner.lora_rank > 0, "
            f"the AV), spread the weights over more ranks (learner.ranks_av / learner.ranks_ar "
            f"with learner.backend=fsdp2 or learner.zero_stage=3), or give each rank more "
            f"memory (learner.num_gpus_per_rank, fewer ranks per device)")
    if ranks_on_host * plan.host_load > host_free:
        how = ("loading reads each rank's shard of the model in fp32" if plan.sharded_load else
               "loading reads the whole model in fp32 on every rank before sharding it")
        raise MemoryPlanError(
            f"{what}: {how} "
            f"({gib(plan.host_load)} each, {ranks_on_host} rank(s) on this host: "
            f"{gib(ranks_on_host * plan.host_load)}) but the host has {gib(host_free)} free. "
            f"Use fewer ranks per node (learner.num_gpus_per_rank / num_cpus_per_rank) or a "
            f"node with more host memory"
            + ("" if plan.sharded_load else ", or load shard by shard (learner.backend=fsdp2 "
               "with learner.sharded_load=true, 2 or more ranks, a safetensors checkpoint)"))


def check_step_fits(plan: RankPlan, *, tokens: int, rows: int, device_free: int, what: str,
                    device: str, micro_batch_tokens: int | None, checkpointing: bool) -> None:
    """Refuse a micro-batch whose activations (and logits) cannot fit in what is free beside
    the weights, before its forward runs out of memory halfway through a step."""
    need = plan.step(tokens) - plan.static
    if need <= device_free:
        return
    advice = [f"lower learner.micro_batch_tokens (now {micro_batch_tokens}; this micro-batch "
              f"has {rows} rows, {tokens} tokens with padding)"]
    if not checkpointing:
        advice.append("turn on learner.gradient_checkpointing")
    advice.append("or lower the micro-batch size / rl.max_new_tokens")
    parts = plan.parts(tokens)
    raise MemoryPlanError(
        f"{what}: a micro-batch of {tokens} tokens needs about {gib(need)} for activations "
        f"({gib(parts['activations'])}) and logits ({gib(parts['logits'])}) but {device} has "
        f"{gib(device_free)} free beside the weights; " + ", ".join(advice))



def device_free_bytes(device) -> int:
    """Bytes a rank can still allocate on ``device``: the CUDA driver's free memory plus what
    torch's caching allocator holds unused; on CPU the host's available memory."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return host_free_bytes()


def host_free_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
