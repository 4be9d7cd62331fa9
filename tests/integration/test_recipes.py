"""Every shipped recipe loads, matches its published preset, and wires up on a tiny stand-in of
the same model family with the same number of blocks (prepare stage + one injected generation)."""

from pathlib import Path

import pytest
import torch

from launch.train import run
from nla_rl.ar_model import ActivationReconstructor
from nla_rl.base_model import load_causal_lm
from nla_rl.config import load_recipe
from nla_rl.roundtrip import InjectionSpec, explain
from nla_rl.sidecar import read_model_sidecar
from nla_rl.templates import DEPTH_AV_TEMPLATE, depth_pct_for
from nla_rl.testing.tiny import TINY_MARKER_CHAR, build_tiny_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# NLA_REFERENCE §8: (tiny family, blocks, K, family, scale, marker) of each seed system.
PRESETS = {
    "qwen2.5-7b-L20.yaml": ("qwen2", 28, 20, "replace", 150.0, "\u320e"),
    "gemma3-12b-L32.yaml": ("gemma3", 48, 32, "replace", 80000.0, "\u321c"),
    "gemma3-27b-L41.yaml": ("gemma3", 62, 41, "replace", 60000.0, "\u321c"),
    "llama3.3-70b-L53.yaml": ("llama", 80, 53, "replace", 30.0, "\u33a1"),
    "qwen3-8b-L24-add.yaml": ("qwen3", 36, 24, "add", None, None),
    "qwen2.5-7b-L20-lora-hardneg.yaml": ("qwen2", 28, 20, "replace", 150.0, "\u320e"),
}


def test_every_recipe_has_a_preset_row():
    shipped = {p.name for p in RECIPES.glob("*.yaml")} - {"tiny.yaml"}
    assert shipped == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recipe_matches_its_preset(name):
    family, blocks, k, inj, scale, marker = PRESETS[name]
    cfg = load_recipe(str(RECIPES / name), [])
    assert (cfg.model.layer_index, cfg.injection.family, cfg.injection.scale, cfg.injection.marker) \
        == (k, inj, scale, marker)
    assert cfg.model.dtype == "bfloat16" and cfg.learner.num_gpus_per_rank == 1
    assert cfg.model.trust_remote_code is False and cfg.wandb.api_key_env == "WANDB_API_KEY"
    for sft, ranks in ((cfg.ar_sft, cfg.learner.ranks_ar), (cfg.av_sft, cfg.learner.ranks_av)):
        assert sft.batch_size % (sft.micro_batch_size * ranks) == 0
    if "lora" in name:
        assert (cfg.learner.lora_rank, cfg.learner.lora_alpha, cfg.learner.lora_dropout) == (32, 64.0, 0.05)
        assert cfg.templates.av == DEPTH_AV_TEMPLATE and cfg.templates.av_prefill == "<explanation>"
        assert cfg.negatives.enabled and cfg.negatives.top_k == 20 and cfg.negatives.per_sample == 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recipe_wires_up_on_a_tiny_stand_in(name, tmp_path):
    family, blocks, k, *_ = PRESETS[name]
    base = tmp_path / "base"
    build_tiny_model(family, base, layers=blocks)
    run_dir = tmp_path / "run"
    # The tiny tokenizer's only single-token marker is ㈎, so other markers are auto-selected.
    marker = [] if PRESETS[name][5] in (None, TINY_MARKER_CHAR) else ["injection.marker=null"]
    run(str(RECIPES / name), [f"run.dir={run_dir}", f"model.base={base}", "model.dtype=float32",
                              "run.stages=[prepare]", "wandb.enabled=false", *marker])
    av_meta = read_model_sidecar(run_dir / "init" / "av")
    ar_meta = read_model_sidecar(run_dir / "init" / "ar")
    cfg = load_recipe(str(RECIPES / name), [])
    assert av_meta.extraction_layer_index == ar_meta.extraction_layer_index == k
    assert av_meta.av_template == cfg.templates.av and av_meta.injection_family == cfg.injection.family
    ar = ActivationReconstructor.from_pretrained(run_dir / "init" / "ar")
    assert ar.config.num_hidden_layers == k + 1

    av, tok = load_causal_lm(run_dir / "init" / "av")
    vectors = torch.randn(2, av.config.hidden_size)
    scale = None if av_meta.injection_family == "add" else (av_meta.injection_scale or 10.0)
    spec = InjectionSpec(av_meta.injection_family, scale,
                         av_meta.injection_add_layer, av_meta.injection_add_coeff)
    texts, applied = explain(av, tok, vectors, marker=av_meta.tokens.marker,
                             template=av_meta.av_template, injection=spec, max_new_tokens=2,
                             prefill=cfg.templates.av_prefill,
                             depth_pct=depth_pct_for(av_meta.av_template, k, blocks))
    assert applied == 2 and len(texts) == 2
