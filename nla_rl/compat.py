"""What other readers of our model directories need, and what must match across an AV/AR pair.

The published NLA code, older vLLM/SGLang and many serving stacks pin transformers 4.x, which
reads files written by transformers 5 differently in two places:

* ``tokenizer_config.json``: v5 names the generic fast tokenizer ``TokenizersBackend``, a class 4.x
  does not have. :func:`make_portable` names ``PreTrainedTokenizerFast`` instead, which both load
  (v5 maps it onto the same backend). Family classes (``Qwen2Tokenizer`` …) load in both already.
* ``config.json``: v5 writes only ``rope_parameters``; 4.x reads ``rope_theta`` and
  ``rope_scaling`` (Gemma-3 also ``rope_local_base_freq``) and silently falls back to
  ``rope_theta = 10000`` without them (Qwen2.5 uses 1e6). :func:`make_portable` adds the 4.x
  fields with the same values; v5 keeps reading ``rope_parameters``, which take precedence.

:func:`check_bos_contract` checks that a tokenizer adds the BOS token it declares (and no undeclared
prefix): the reference critic asserts it, because the AR is trained on prompts tokenised with
special tokens. :func:`same_base_problem` compares the two halves of a pair by what must match
(architecture, width, vocabulary, BOS) instead of the path their sidecars record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nla_rl.atomic import atomic_write_text
from nla_rl.errors import SidecarError

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Tokenizer classes only transformers 5 knows, each with the class both majors load.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": PORTABLE_TOKENIZER_CLASS}
# Keys of a per-attention-type rope_parameters (Gemma-3): the global layers and the local ones.
_GLOBAL, _LOCAL = "full_attention", "sliding_attention"
BOS_PROBE = "x"
# Config fields that identify a base model (the AR's config is truncated: its layer count differs).
_IDENTITY_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "rope_parameters",
                    "rope_theta")


class TokenizerContractError(SidecarError):
    """A tokenizer declares a special token it does not add, or adds one it does not declare."""


# ----------------------------------------------------------------------------- portable files

def v4_rope_fields(config: dict) -> dict:
    """The transformers-4.x rope fields equivalent to ``config["rope_parameters"]`` (v5 layout);
    empty when there is none. Per-attention-type parameters (Gemma-3) map to ``rope_theta`` and
    ``rope_scaling`` of the global layers and ``rope_local_base_freq`` of the sliding ones."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    local = None
    if isinstance(params.get(_GLOBAL), dict):
        local, params = params.get(_LOCAL), params[_GLOBAL]
    out = {"rope_theta": params.get("rope_theta", config.get("rope_theta")),
           "rope_scaling": _v4_scaling(params)}
    if isinstance(local, dict) and "rope_theta" in local:
        out["rope_local_base_freq"] = local["rope_theta"]
    return {k: v for k, v in out.items() if v is not None or k == "rope_scaling"}


def _v4_scaling(params: dict) -> dict | None:
    """4.x's ``rope_scaling``: null for plain rope, else the parameters without the base."""
    if params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def portable_config(config: dict) -> dict:
    """``config`` (a parsed ``config.json``) with the 4.x rope fields added, also to a nested
    ``text_config`` (multimodal checkpoints)."""
    out = {**config, **v4_rope_fields(config)}
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = portable_config(config["text_config"])
    return out


def portable_tokenizer_config(tokenizer_config: dict) -> dict:
    """``tokenizer_config`` with a tokenizer class both transformers majors can load."""
    cls = tokenizer_config.get("tokenizer_class")
    if cls in _V5_ONLY_TOKENIZER_CLASSES:
        return {**tokenizer_config, "tokenizer_class": _V5_ONLY_TOKENIZER_CLASSES[cls]}
    return tokenizer_config


def make_portable(model_dir: str | Path) -> None:
    """Rewrite ``config.json`` and ``tokenizer_config.json`` of ``model_dir`` (where present)
    so that transformers 4.x reads the same model and tokenizer as transformers 5 (atomically)."""
    model_dir = Path(model_dir)
    for name, convert in (("config.json", portable_config),
                          ("tokenizer_config.json", portable_tokenizer_config)):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            converted = convert(data)
            if converted != data:
                atomic_write_text(path, json.dumps(converted, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- the BOS contract

def check_bos_contract(tokenizer, where) -> None:
    """Raise :class:`TokenizerContractError` unless ``tokenizer(text, add_special_tokens=True)``
    is ``[bos] + tokenizer(text, add_special_tokens=False)`` when a BOS token is declared, and
    starts with the plain ids when none is (Qwen2.5: no BOS; Gemma/Llama: BOS added)."""
    plain = list(tokenizer(BOS_PROBE, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(BOS_PROBE, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and special[:len(plain) + 1] != [bos] + plain:
        raise TokenizerContractError(
            f"{where}: the tokenizer declares bos_token {tokenizer.bos_token!r} (id {bos}) but "
            f"tokenising {BOS_PROBE!r} with special tokens gives {special}, not [{bos}] + {plain}. "
            "Readers that trust the declaration (the reference AR critic) refuse it: declare no "
            "BOS token (bos_token=None, as Qwen2.5 does), or make the tokenizer add it "
            "(a post-processor that prepends it, as Gemma and Llama do)")
    if bos is None and special[:len(plain)] != plain:
        raise TokenizerContractError(
            f"{where}: the tokenizer declares no BOS token but tokenising {BOS_PROBE!r} with "
            f"special tokens gives {special}, not {plain} followed by suffix tokens; declare the "
            "token it prepends as bos_token")


# ----------------------------------------------------------------------------- pairs

def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def base_identity(config) -> dict:
    """The fields of ``config`` (its text part) that identify the base model of a checkpoint."""
    text = _text_config(config)
    return {name: getattr(text, name, None) for name in _IDENTITY_FIELDS}


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token → id, added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def same_base_problem(av_config, av_tokenizer, ar_config, ar_tokenizer) -> str | None:
    """Why an AV and an AR cannot be one pair (a different base model or tokenizer), or None."""
    av_id, ar_id = base_identity(av_config), base_identity(ar_config)
    for name in _IDENTITY_FIELDS:
        if av_id[name] != ar_id[name]:
            return (f"the AV's and the AR's base models differ: config {name} is {av_id[name]!r} "
                    f"for the AV but {ar_id[name]!r} for the AR")
    av_tok = (vocab_fingerprint(av_tokenizer), av_tokenizer.bos_token_id)
    ar_tok = (vocab_fingerprint(ar_tokenizer), ar_tokenizer.bos_token_id)
    if av_tok != ar_tok:
        return ("the AV's and the AR's tokenizers differ (vocabulary hash, BOS id): "
                f"{av_tok} for the AV but {ar_tok} for the AR")
    return None
