"""Resolving and loading the base LM a recipe names: a local Hugging Face directory, or
``tiny:<family>`` (a tiny random model built offline, for the CPU recipe and tests).

Loading is always local (``local_files_only``), safetensors-only, and ``trust_remote_code`` stays
off unless the recipe turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nla_rl.errors import ConfigError

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
                            ending=toyworld.ending)
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
    return path


def load_causal_lm(path: Path, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a local directory (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: expected one of {sorted(DTYPES)}, found {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], local_files_only=True, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    return model, tokenizer
