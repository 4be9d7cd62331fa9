"""What a learner rank trains: the AV (a causal LM, optionally with a LoRA adapter) or the AR.

Every rank builds the same model from the same directory with the same seed (a LoRA adapter's
random init must be identical on all ranks before the backend shards it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nla_rl.errors import ConfigError
from nla_rl.roundtrip import InjectionSpec
from nla_rl.tokens import MarkerTokens

ROLES = ("av", "ar")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter of the AV (``rank`` 0 = full fine-tune)."""

    rank: int = 0
    alpha: float = 64.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """Where a role's model lives and how it is used (everything a rank needs, picklable)."""

    role: str
    model_dir: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    gradient_checkpointing: bool = False
    with_reference: bool = False  # a frozen copy: the AV's KL reference, the AR's truth check
    # AV only: the injection and the prompt (from the model sidecar).
    injection: InjectionSpec | None = None
    marker: MarkerTokens | None = None
    av_template: str = ""
    av_prefill: str = ""
    depth_pct: int | None = None  # for an AV template that shows the layer depth
    # AR only.
    ar_template: str = ""
    mse_scale: float | None = None
    reward_basis: str = ""  # a reward_basis.safetensors the AR's loss is measured in ("" = raw)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"learner role: expected one of {ROLES}, found {self.role!r}")


def apply_lora(model, lora: LoraSpec):
    """Wrap ``model`` in a peft LoRA adapter, after checking every target module exists."""
    from peft import LoraConfig, get_peft_model

    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)}
    missing = [t for t in lora.target_modules if t not in leaf_names]
    if not lora.target_modules or missing:
        raise ConfigError(
            f"learner.lora_target_modules: {missing or 'none given'} match no Linear layer of "
            f"{type(model).__name__}; Linear layers found: {', '.join(sorted(leaf_names))}")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        use_rslora=lora.use_rslora, target_modules=list(lora.target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model_dir, local_files_only=True,
                                         trust_remote_code=spec.trust_remote_code)


def build_model(spec: ModelSpec, *, seed: int) -> torch.nn.Module:
    """The trainable model of ``spec.role``, in fp32 master weights (mixed precision is the
    backend's business)."""
    torch.manual_seed(seed)  # same LoRA init on every rank
    if spec.role == "ar":
        from nla_rl.ar_model import ActivationReconstructor

        model = ActivationReconstructor.from_pretrained(spec.model_dir, dtype=torch.float32,
                                                        trust_remote_code=spec.trust_remote_code)
        if spec.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable()
        return model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        spec.model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True,
        trust_remote_code=spec.trust_remote_code)
    if spec.gradient_checkpointing:  # before any injection hook is registered (it clears hooks)
        model.gradient_checkpointing_enable()
    if spec.lora.rank > 0:
        model = apply_lora(model, spec.lora)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of a full fine-tune's initial weights (the KL reference policy)."""
    import copy

    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The decoder blocks to shard one by one (AV: through peft wrappers; AR: its backbone)."""
    from nla_rl.injection import get_decoder_layers

    target = model.backbone if hasattr(model, "value_head") else model
    return list(get_decoder_layers(target))
