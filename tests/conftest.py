"""Shared fixtures: tiny offline models and tokenizers, built once per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nla_rl.testing.tiny import FAMILIES, build_tiny_model

# One thread per process: two threads on a 2-core machine over-subscribe and slow tests 5-30x.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@dataclass
class TinyModel:
    """A tiny model saved on disk, with the loaded model and tokenizer."""

    family: str
    path: Path
    model: torch.nn.Module
    tokenizer: object

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, TinyModel]:
    """One tiny model per family (qwen2, qwen3, llama, gemma3), 4 layers, hidden 64, 2 heads."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for family in FAMILIES:
        model, tok = build_tiny_model(family, root / family, seed=0)
        model.eval()
        out[family] = TinyModel(family, root / family, model, tok)
    return out


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models) -> TinyModel:
    """Parametrised over every family."""
    return tiny_models[request.param]


@pytest.fixture
def qwen(tiny_models) -> TinyModel:
    return tiny_models["qwen2"]
