"""Shared set-up of the engine tests: a tiny model whose outputs depend on the injected vector.

The default tiny models (init std 0.02) are so flat that greedy decoding repeats one token
whatever is injected, which would make parity trivially true; a larger init std (0.3) and short
prompts make the continuation depend on the vector, so parity and injection are really tested.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nla_rl.roundtrip import InjectionSpec
from nla_rl.testing.tiny import TINY_MARKER_CHAR, build_tiny_tokenizer, tiny_config
from nla_rl.tokens import MarkerTokens, marker_tokens
from rollout.base import RolloutRequest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MARKER_TEMPLATE = "<concept>{injection_char}</concept>"
PREFIXES = ("", "the cat ", "a red dog sits ", "one ", "the cat ")
INJECTIONS = {"replace": InjectionSpec("replace", scale=20.0),
              "add": InjectionSpec("add", layer=1, coeff=2.0)}
ENGINE_KWARGS = dict(kv_cache_gib=0.25, max_model_len=256)


def build_model(out_dir: Path, family: str = "qwen2", seed: int = 0, init_std: float = 0.3):
    """A tiny random causal LM (hidden 64, 2 heads of 32) saved to ``out_dir``; returns (model, tok)."""
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer(family, out_dir)
    config = tiny_config(family, len(tok), tokenizer=tok)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, tok


def save_adapter(model_dir: Path, out_dir: Path, rank: int = 8, seed: int = 1) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, so it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out_dir)
    return out_dir


def perturbed_state(model, scale: float = 0.05, seed: int = 2) -> dict:
    """A learner's 'next step' weights: every parameter moved by scale·N(0, 1) (ties kept)."""
    import copy

    learner = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return learner


def marker_of(tok) -> MarkerTokens:
    return marker_tokens(tok, MARKER_TEMPLATE, TINY_MARKER_CHAR)


def make_requests(tok, marker: MarkerTokens, d_model: int, seed: int = 0) -> list[RolloutRequest]:
    """Short prompts of different lengths; the first and last share a prompt, not a vector."""
    gen = torch.Generator().manual_seed(seed)
    text = MARKER_TEMPLATE.format(injection_char=marker.char)
    return [RolloutRequest(tok.encode(prefix + text, add_special_tokens=False),
                           torch.randn(d_model, generator=gen), request_id=str(i))
            for i, prefix in enumerate(PREFIXES)]


def max_abs_diff(a, b) -> float:
    return max(abs(x - y) for rows_a, rows_b in zip(a, b) for x, y in zip(rows_a, rows_b))
