"""What a learner rank trains: the AV (a causal LM, optionally with a LoRA adapter) or the AR.

Every rank builds the same model from the same directory with the same seed (a LoRA adapter's
random init must be identical on all ranks before the backend shards it). Two ways:
:func:`build_model` loads the whole checkpoint (DeepSpeed, one rank, non-safetensors
checkpoints); :func:`build_empty_model` builds it with its weights on ``meta`` and returns where
each tensor lives in the checkpoint, for FSDP2 to fill rank by rank
(:mod:`actors.sharded_load`). Both give bit-identical models once filled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    # AR-SFT only (ar_sft.loss_basis): the basis of the loss's second term, and its weight
    loss_basis: str = ""
    loss_basis_weight: float = 0.0
    # AR-SFT only (ar_sft.contrast_weight): the contrast bank file, the term's weight and τ
    contrast_bank: str = ""
    contrast_weight: float = 0.0
    contrast_tau: float = 0.1

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"learner role: expected one of {ROLES}, found {self.role!r}")


def apply_lora(model, lora: LoraSpec, *, seed: int = 0):
    """Wrap ``model`` in a peft LoRA adapter, after checking every target module exists; the
    adapter is initialised from ``seed`` (:func:`init_adapters`)."""
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
    return init_adapters(get_peft_model(model, config), seed=seed)


def init_adapters(model, *, seed: int):
    """(Re)initialise every LoRA adapter with peft's own init (A: Kaiming-uniform, B: zeros)
    from ``seed``, in module order, on CPU when it was on ``meta``. Both load paths call it, so
    the adapters are identical on every rank and in either path (peft's init at creation draws
    from a stream the meta build does not reproduce)."""
    from peft.tuners.lora import LoraLayer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.lora_A:
                for part in (module.lora_A[adapter], module.lora_B[adapter]):
                    if any(p.is_meta for p in part.parameters()):
                        part.to_empty(device="cpu")
                module.reset_lora_parameters(adapter, True)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model_dir, local_files_only=True,
                                         trust_remote_code=spec.trust_remote_code)


def build_model(spec: ModelSpec, *, seed: int) -> torch.nn.Module:
    """The trainable model of ``spec.role``, in fp32 master weights (mixed precision is the
    backend's business), loaded whole."""
    if spec.role == "ar":
        from nla_rl.ar_model import ActivationReconstructor

        model = ActivationReconstructor.from_pretrained(spec.model_dir, dtype=torch.float32,
                                                        trust_remote_code=spec.trust_remote_code)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            spec.model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True,
            trust_remote_code=spec.trust_remote_code)
    return _finish(model, spec, seed=seed)


def _finish(model, spec: ModelSpec, *, seed: int):
    """Gradient checkpointing and the LoRA adapter, the same on either load path."""
    if spec.gradient_checkpointing:  # before any injection hook is registered (it clears hooks)
        target = model.backbone if spec.role == "ar" else model
        target.gradient_checkpointing_enable()
    if spec.role == "av" and spec.lora.rank > 0:
        model = apply_lora(model, spec.lora, seed=seed)
    return model


@dataclass(frozen=True)
class EmptyModel:
    """A model whose weights are on ``meta`` (buffers and LoRA adapters real), and where each of
    its tensors lives in the checkpoint, for :func:`actors.sharded_load.fill_shards`."""

    module: torch.nn.Module
    where: dict  # module tensor name → (file, key); absent: not stored (buffers, adapters)
    expected: set | None  # every (file, key) that must be used (the AR: no unexpected weight)

    def locate(self, name: str):
        return self.where.get(name)


def _locations(model, stored: dict, rename) -> dict:
    """Module tensor name → (file, key) of the stored tensor ``rename(name)``, where stored."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return {n: (stored[rename(n)], rename(n)) for n in names if rename(n) in stored}


def _peft_to_stored(name: str) -> str:
    """peft's name of a base weight → its checkpoint key (``base_model.model.`` prefix and the
    ``.base_layer`` of a wrapped Linear dropped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def build_empty_model(spec: ModelSpec, *, seed: int) -> EmptyModel:
    """``spec``'s model built from its config with its weights on ``meta`` (no memory), for
    sharded loading; once filled it equals :func:`build_model`'s (the learner tests compare)."""
    from actors.sharded_load import checkpoint_keys, empty_weights

    stored = checkpoint_keys(spec.model_dir)
    if spec.role == "ar":
        from nla_rl.ar_model import VALUE_HEAD_FILE, VALUE_HEAD_KEY, ActivationReconstructor

        with empty_weights():
            model = ActivationReconstructor.from_config_of(spec.model_dir, dtype=torch.float32)
        model = _finish(model, spec, seed=seed)
        # the backbone's weights are stored without its "backbone." prefix, the head apart
        where = _locations(model, stored, lambda n: n.removeprefix("backbone."))
        head = (Path(spec.model_dir) / VALUE_HEAD_FILE, VALUE_HEAD_KEY)
        where["value_head.weight"] = head
        expected = {(path, key) for key, path in stored.items()} | {head}
        return EmptyModel(model, where, expected)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec.model_dir, local_files_only=True)
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # from_pretrained ties; from_config on meta leaves lm_head apart
    model = _finish(model, spec, seed=seed)
    rename = _peft_to_stored if spec.lora.rank > 0 else (lambda n: n)
    return EmptyModel(model, _locations(model, stored, rename), expected=None)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of a full fine-tune's initial weights (the KL reference policy)."""
    import copy

    return freeze(copy.deepcopy(model))


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The decoder blocks to shard one by one (AV: through peft wrappers; AR: its backbone)."""
    from nla_rl.injection import get_decoder_layers

    target = model.backbone if hasattr(model, "value_head") else model
    return list(get_decoder_layers(target))
