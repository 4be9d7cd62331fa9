"""The activation reconstructor (AR): blocks 0..K of the base LM plus an identity-initialised head.

Checkpoint layout (compatible with the reference implementation): an ordinary Hugging Face
causal-LM directory whose ``config.json`` has ``num_hidden_layers = K + 1`` (per-layer lists such as
``layer_types`` truncated to match), weights of the truncated backbone *without* the final norm and
*without* ``lm_head`` (both are ``nn.Identity`` in the AR), ``value_head.safetensors`` holding
exactly one tensor ``weight`` of shape [d, d], the tokenizer saved with ``padding_side="right"``, and
``nla_meta.yaml`` (the sidecar, written by the caller through the ``extra_files`` hook).

Prediction: ``ĥ = W · h_K[last]`` where ``h_K`` is the output of block K (no final norm, nothing
normalised before the head) and ``last`` is the rightmost real token of each row, so left and right
padding give the same result. The head is computed in fp32 and the result is always fp32.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nla_rl.atomic import atomic_dir
from nla_rl.errors import NLAError
from nla_rl.templates import DEFAULT_AR_TEMPLATE, ar_text

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_KEY = "weight"
# Config fields holding one entry per decoder layer; truncated together with num_hidden_layers.
_PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


class ARModelError(NLAError):
    """An AR checkpoint or base model cannot be built, loaded or used as asked."""


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars; we check the loading info ourselves."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost 1 of each row of ``attention_mask`` [B, T] (left or right padding)."""
    mask = attention_mask.to(torch.long)
    if bool((mask.sum(dim=-1) == 0).any()):
        raise ARModelError("attention_mask has a row with no real token; every AR input needs ≥ 1 token")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask * positions).argmax(dim=-1)


def block_hidden_states(backbone: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """Output of the last kept block [B, T, d] of a truncated ``backbone`` (norm = Identity).

    Works with left or right padding: position ids count real tokens only, so a padded row sees
    the same positions as the unpadded text. Calls the inner decoder directly (no lm_head).
    """
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    inner = getattr(backbone, backbone.base_model_prefix)
    return inner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                 use_cache=False).last_hidden_state


def _truncate_config(config, num_layers: int):
    """Copy of ``config`` with ``num_layers`` decoder layers (per-layer lists truncated too)."""
    config = copy.deepcopy(config)
    total = config.num_hidden_layers
    config.num_hidden_layers = num_layers
    for key in _PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, list(value)[:num_layers])
    return config


def _strip_norm_and_head(lm: nn.Module) -> nn.Module:
    """Replace the final norm and ``lm_head`` of an HF causal LM by ``nn.Identity`` (in place)."""
    inner = getattr(lm, lm.base_model_prefix)
    if not hasattr(inner, "norm") or not hasattr(lm, "lm_head"):
        raise ARModelError(f"{type(lm).__name__}: expected `.{lm.base_model_prefix}.norm` and `.lm_head`; "
                           f"this architecture is not supported by the AR")
    inner.norm = nn.Identity()
    lm.lm_head = nn.Identity()
    return lm


def _check_loading_info(info: dict, source, *, allowed_missing: Callable[[str], bool],
                        allowed_unexpected: Callable[[str], bool]) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if not allowed_missing(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not allowed_unexpected(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    errors = list(info.get("error_msgs", ()))
    if missing or unexpected or mismatched or errors:
        raise ARModelError(
            f"loading {source}: weights do not match the model (missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, mismatched {mismatched[:8]}, errors {errors[:3]}). Check that the "
            f"directory is a complete checkpoint of this architecture."
        )


def _load_causal_lm(path, config, dtype, trust_remote_code):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )


class ActivationReconstructor(nn.Module):
    """Truncated base LM (blocks 0..K, no final norm, no lm_head) + bias-free [d, d] value head."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear | None = None):
        """``backbone``: an HF causal LM whose final norm and lm_head are already ``nn.Identity``."""
        super().__init__()
        self.backbone = backbone
        d = backbone.config.hidden_size
        if value_head is None:
            param = next(backbone.parameters())
            value_head = nn.Linear(d, d, bias=False, device=param.device, dtype=param.dtype)
            with torch.no_grad():  # identity: the default init would shrink outputs by ≈ 1/√3
                value_head.weight.copy_(torch.eye(d, dtype=value_head.weight.dtype))
        if value_head.bias is not None or tuple(value_head.weight.shape) != (d, d):
            raise ARModelError(f"value head: expected a bias-free Linear({d}, {d}), found "
                               f"weight {list(value_head.weight.shape)}, bias {value_head.bias is not None}")
        self.value_head = value_head

    # ----------------------------------------------------------------------------- properties
    @property
    def config(self):
        return self.backbone.config

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layer_index(self) -> int:
        """K, the base-model block whose output the AR predicts (``num_hidden_layers - 1``)."""
        return int(self.config.num_hidden_layers) - 1

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_base(cls, base_dir, layer_index: int, *, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False) -> ActivationReconstructor:
        """Build a fresh AR from a full base model directory: blocks 0..K and an identity head.

        Only the first K+1 layers are loaded (the model is built from a config with
        ``num_hidden_layers = K + 1``); the deeper layers' weights are skipped.
        """
        from transformers import AutoConfig

        from nla_rl.base_model import check_model_dir

        check_model_dir(base_dir, "base model")
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
        total = int(config.num_hidden_layers)
        if not 0 <= layer_index < total:
            raise ARModelError(
                f"layer_index: expected 0 ≤ K < {total} (the base model has {total} decoder blocks and "
                f"the AR keeps K+1 of them), found K={layer_index}. Choose K in 0..{total - 1}."
            )
        config = _truncate_config(config, layer_index + 1)
        lm, info = _load_causal_lm(base_dir, config, dtype, trust_remote_code)
        prefix = f"{lm.base_model_prefix}.layers."

        def deeper_layer_or_head(key: str) -> bool:
            if key.startswith("lm_head.") or key.startswith(f"{lm.base_model_prefix}.norm."):
                return True
            if key.startswith(prefix):
                index = key[len(prefix):].split(".", 1)[0]
                return index.isdigit() and int(index) > layer_index
            return False

        _check_loading_info(info, base_dir, allowed_missing=lambda k: False,
                            allowed_unexpected=deeper_layer_or_head)
        return cls(_strip_norm_and_head(lm))

    @classmethod
    def from_pretrained(cls, ar_dir, *, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> ActivationReconstructor:
        """Load an AR checkpoint written by :meth:`save_pretrained` (or the reference implementation)."""
        from nla_rl.base_model import check_model_dir

        ar_dir = check_model_dir(ar_dir, "AR")
        head_path = ar_dir / VALUE_HEAD_FILE
        if not head_path.is_file():
            raise ARModelError(f"{head_path}: {VALUE_HEAD_FILE} not found; an AR checkpoint needs its "
                               f"value head (is {ar_dir} an AV or base-model directory?)")
        lm, info = _load_causal_lm(ar_dir, None, dtype, trust_remote_code)
        norm_prefix = f"{lm.base_model_prefix}.norm."
        # The AR was saved with Identity norm/lm_head, so exactly those weights are absent.
        _check_loading_info(info, ar_dir,
                            allowed_missing=lambda k: k.startswith(("lm_head.", norm_prefix)),
                            allowed_unexpected=lambda k: False)
        lm = _strip_norm_and_head(lm)
        tensors = load_file(str(head_path))
        d = int(lm.config.hidden_size)
        weight = tensors.get(VALUE_HEAD_KEY)
        if set(tensors) != {VALUE_HEAD_KEY} or weight is None or tuple(weight.shape) != (d, d):
            found = {k: list(v.shape) for k, v in tensors.items()}
            raise ARModelError(f"{head_path}: expected exactly one tensor {VALUE_HEAD_KEY!r} of shape "
                               f"[{d}, {d}], found {found}")
        head = nn.Linear(d, d, bias=False, dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(weight.to(dtype))
        return cls(lm, head)

    @classmethod
    def from_config_of(cls, ar_dir, *, dtype: torch.dtype = torch.float32,
                       trust_remote_code: bool = False) -> ActivationReconstructor:
        """The AR of checkpoint ``ar_dir`` built from its config alone, weights *not* loaded:
        under an empty-weights context they are on ``meta`` for a sharded load to fill
        (:mod:`actors.sharded_load`; the backbone's from the checkpoint, the head from
        ``value_head.safetensors``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from nla_rl.base_model import check_model_dir

        ar_dir = check_model_dir(ar_dir, "AR")
        if not (ar_dir / VALUE_HEAD_FILE).is_file():
            raise ARModelError(f"{ar_dir / VALUE_HEAD_FILE}: not found; an AR checkpoint needs "
                               f"its value head (is {ar_dir} an AV or base-model directory?)")
        config = AutoConfig.from_pretrained(ar_dir, trust_remote_code=trust_remote_code)
        with quiet_transformers():
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                  trust_remote_code=trust_remote_code)
        d = int(config.hidden_size)
        return cls(_strip_norm_and_head(lm), nn.Linear(d, d, bias=False, dtype=dtype))

    # ----------------------------------------------------------------------------- saving
    def save_pretrained(self, out_dir, tokenizer=None, *,
                        extra_files: Callable[[Path], None] | None = None) -> Path:
        """Write the checkpoint atomically: into a temp dir beside ``out_dir``, then rename.

        Writes config + truncated weights (safetensors), ``value_head.safetensors`` and, if given,
        the tokenizer with right padding. ``extra_files(tmp_dir)`` is called before the rename so
        that callers can add files (the ``nla_meta.yaml`` sidecar) to the same atomic commit.
        On any failure the previous ``out_dir`` (if any) is left untouched.
        """
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            tmp.mkdir()
            with quiet_transformers():
                self.backbone.save_pretrained(tmp, safe_serialization=True)
            _write_value_head(self.value_head.weight, tmp / VALUE_HEAD_FILE)
            if tokenizer is not None:
                _save_tokenizer_right_padded(tokenizer, tmp)
            if extra_files is not None:
                extra_files(tmp)
        return out_dir

    # ----------------------------------------------------------------------------- inference
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted activations [B, d] (fp32) at the last real token of each row.

        Calls the inner decoder (``backbone.model``) directly: when sharding (FSDP2), wrap this
        module or the decoder layers, not ``backbone`` alone, whose own forward is bypassed.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        last = last_token_index(mask)
        hidden = block_hidden_states(self.backbone, input_ids, mask)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.linear(h.float(), self.value_head.weight.float())

    @torch.no_grad()
    def reconstruct(self, tokenizer, texts: Sequence[str] | str, *, template: str = DEFAULT_AR_TEMPLATE,
                    batch_size: int = 32) -> torch.Tensor:
        """Predict activations [n, d] (fp32, on CPU) for explanation ``texts``.

        Each text is rendered with ``ar_text(template, text)`` and tokenised *with* special tokens
        (BOS for Gemma/Llama). Rows are batched by length and right-padded.
        """
        if isinstance(texts, str):
            texts = [texts]
        if batch_size < 1:
            raise ARModelError(f"batch_size: expected ≥ 1, found {batch_size}")
        out = torch.empty(len(texts), self.d_model, dtype=torch.float32)
        if not texts:
            return out
        encoded = tokenizer([ar_text(template, t) for t in texts], add_special_tokens=True)["input_ids"]
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        device = next(self.parameters()).device
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, :len(encoded[i])] = 1
            out[rows] = self(ids.to(device), mask.to(device)).cpu()
        return out


def _write_value_head(weight: torch.Tensor, path: Path) -> None:
    save_file({VALUE_HEAD_KEY: weight.detach().to("cpu").contiguous()}, str(path))


def _save_tokenizer_right_padded(tokenizer, out_dir: Path) -> None:
    previous = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.padding_side = previous
