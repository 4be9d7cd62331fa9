"""Resolving and loading the base LM a recipe names: a local Hugging Face directory, or
``tiny:<family>`` (a tiny random model built offline, for the CPU recipe and tests).

Loading is always local (``local_files_only``), safetensors-only, and ``trust_remote_code`` stays
off unless the recipe turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nla_rl.errors import ConfigError, NLAError

TINY_PREFIX = "tiny:"
TOYWORLD = "toyworld"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_base_model(base: str, run_dir: Path, *, seed: int = 0, toyworld=None) -> Path:
    """The directory of the base model. ``tiny:<family>`` is built and ``toyworld`` trained (with
    the recipe's ``toyworld`` section) into ``run_dir/base`` once, then reused."""
    if base == TOYWORLD:
        from nla_rl.data.toy_lm import train_toy_lm

        if toyworld is None:
            raise ConfigError("model.base: toyworld needs the recipe's toyworld section")
        return train_toy_lm(Path(run_dir) / "base", seed=seed, steps=toyworld.lm_steps,
                            hidden=toyworld.lm_hidden, layers=toyworld.lm_layers,
                            ending=toyworld.ending, kv_heads=toyworld.lm_kv_heads,
                            recap_loss_weight=toyworld.recap_loss_weight, p_slot=toyworld.p_slot)
    if base.startswith(TINY_PREFIX):
        from nla_rl.testing.tiny import build_tiny_model

        target = Path(run_dir) / "base"
        if not (target / "config.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            build_tiny_model(base[len(TINY_PREFIX):], tmp, seed=seed)
            tmp.rename(target)  # atomic: a killed build never looks finished
        return target
    path = Path(base).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"model.base: {base!r} is not a local Hugging Face model directory (no config.json). "
            "Download the model first (e.g. `hf download ORG/NAME --local-dir DIR`) and point "
            "model.base at DIR, or use toyworld / tiny:qwen2 for an offline model"
        )
    check_model_dir(path, "model.base")
    return path


def check_model_dir(path, what: str = "model directory") -> Path:
    """``path`` if it is a local Hugging Face model directory whose weights can be read: one clear
    error for a missing directory, a file, no ``config.json``, no ``*.safetensors`` or one that is
    truncated or not safetensors at all. Only the headers are read (memory-mapped), so it is cheap;
    it runs before transformers, whose errors for these cases are tracebacks (a Hub "Repo id must
    be …" message for a missing local path)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise NLAError(f"{what} {str(path)!r}: no such directory; give a local Hugging Face model "
                       f"directory (config.json + *.safetensors)")
    if not path.is_dir():
        raise NLAError(f"{what} {str(path)!r} is a file; give the model's directory (config.json "
                       f"+ *.safetensors)")
    if not (path / "config.json").is_file():
        raise NLAError(f"{what} {str(path)!r}: no config.json, so this is not a Hugging Face model "
                       f"directory")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise NLAError(f"{what} {str(path)!r}: no *.safetensors weights (only safetensors are "
                       f"loaded; re-save the model with save_pretrained(safe_serialization=True))")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise NLAError(f"{what}: {file} is truncated or not a safetensors file ({err}); "
                           f"re-download or re-export the model") from None
    return path


def load_causal_lm(path: Path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a local directory (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: expected one of {sorted(DTYPES)}, found {dtype!r}")
    check_model_dir(path, "model")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], local_files_only=True, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    return model, tokenizer


def check_context(config, prompt_tokens: int, max_new_tokens: int, what: str) -> None:
    """Refuse a generation cap the model cannot hold: ``prompt + max_new_tokens`` positions must
    fit the model's ``max_position_embeddings`` (past it, positions are out of the trained range
    or the engine refuses mid-run). ``what`` names the setting to lower in the message."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text, "max_position_embeddings", None)
    if not isinstance(context, int) or context <= 0:
        return  # the model does not say: nothing to check against
    if prompt_tokens + max_new_tokens > context:
        raise ConfigError(f"{what}: {max_new_tokens} new tokens after the {prompt_tokens}-token "
                          f"AV prompt need {prompt_tokens + max_new_tokens} positions, but the "
                          f"model's context is {context} (max_position_embeddings); set {what} "
                          f"<= {context - prompt_tokens}")
