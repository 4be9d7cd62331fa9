"""The inference API (nla_rl.inference.NLA) on tiny offline pairs of both injection families."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from nla_rl.ar_model import ActivationReconstructor
from nla_rl.errors import SidecarError
from nla_rl.inference import NLA, InferenceError
from nla_rl.metrics import cosine, fve
from nla_rl.roundtrip import InjectionSpec, explain as reference_explain
from nla_rl.sidecar import ModelSidecar, make_token_meta, read_model_sidecar, write_model_sidecar
from nla_rl.templates import (DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE,
                              depth_percent, extract_explanation)
from nla_rl.tokens import critic_suffix_ids, marker_token_id

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sidecars"
K = 2
NEW_TOKENS = 6


def make_pair(root: Path, tiny, *, family: str = "replace", av_template: str = DEFAULT_AV_TEMPLATE,
              ar_layer: int = K, scale: float | None = 20.0) -> tuple[Path, Path]:
    """A prepare-like pair: the tiny model as the AV, blocks 0..ar_layer + identity head as the AR."""
    layers = tiny.model.config.num_hidden_layers
    depth = depth_percent(K, layers) if "{depth_pct}" in av_template else None
    tokens = make_token_meta(tiny.tokenizer, av_template, DEFAULT_AR_TEMPLATE, depth_pct=depth)
    common = dict(stage="init", base_checkpoint=f"tiny:{tiny.family}", d_model=tiny.d_model,
                  mse_scale=tiny.d_model ** 0.5, tokens=tokens, av_template=av_template,
                  ar_template=DEFAULT_AR_TEMPLATE, injection_family=family)
    av_dir, ar_dir = root / "av", root / "ar"
    shutil.copytree(tiny.path, av_dir)
    write_model_sidecar(av_dir, ModelSidecar(role="av", extraction_layer_index=K,
                                             injection_scale=scale if family == "replace" else None,
                                             **common))
    ar = ActivationReconstructor.from_base(tiny.path, ar_layer)
    ar_meta = ModelSidecar(role="ar", extraction_layer_index=ar_layer, injection_scale=None, **common)
    ar.save_pretrained(ar_dir, tiny.tokenizer, extra_files=lambda d: write_model_sidecar(d, ar_meta))
    return av_dir, ar_dir


def _vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3


def _edit_sidecar(directory: Path, dotted: str, value) -> None:
    path = directory / "nla_meta.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


@pytest.mark.parametrize("family", ["replace", "add"])
def test_score_matches_the_reference_round_trip(tmp_path, qwen, family):
    av_dir, ar_dir = make_pair(tmp_path, qwen, family=family)
    nla = NLA.from_pretrained(av_dir, ar_dir)
    meta = read_model_sidecar(av_dir)
    assert nla.injection.family == family and nla.layer_index == K and nla.d_model == qwen.d_model
    vectors = _vectors(5, qwen.d_model)
    result = nla.score(vectors, max_new_tokens=NEW_TOKENS, batch_size=2)  # batches of 2, 2, 1

    spec = InjectionSpec(family, 20.0 if family == "replace" else None)
    texts, applied = reference_explain(nla.av_model, nla.av_tokenizer, vectors, marker=meta.marker,
                                       template=meta.av_template, injection=spec,
                                       max_new_tokens=NEW_TOKENS)
    assert result.texts == texts and applied == result.injections_applied == 5
    assert result.explanations == [extract_explanation(t) for t in texts]
    preds = nla.reconstruct(result.explanations)
    torch.testing.assert_close(result.predictions, preds)
    torch.testing.assert_close(result.cosine, cosine(preds, vectors))
    torch.testing.assert_close(result.mse, 2 * (1 - result.cosine), atol=1e-5, rtol=1e-5)
    assert result.fve == pytest.approx(fve(preds, vectors, nla.mse_scale))
    assert len(result.rows()) == 5 and result.rows()[0].keys() >= {"explanation", "mse", "cosine"}


def test_no_injection_control_and_sampling(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen)
    nla = NLA.from_pretrained(av_dir, ar_dir)
    vectors = _vectors(3, qwen.d_model)
    off = nla.generate(vectors, max_new_tokens=NEW_TOKENS, inject=False)
    assert off.injections_applied == 0 and len(set(off.texts)) == 1  # same prompt, no vector
    first = nla.generate(vectors, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7).texts
    assert first == nla.generate(vectors, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7).texts


def test_null_replace_scale_is_chosen_from_the_vectors(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen, scale=None)
    nla = NLA.from_pretrained(av_dir, ar_dir)
    vectors = _vectors(4, qwen.d_model)
    generation = nla.generate(vectors, max_new_tokens=2)
    assert generation.injection_scale == pytest.approx(1.1 * float(vectors.norm(dim=-1).mean()))
    fixed = NLA.from_pretrained(av_dir, ar_dir, injection_scale=5.0)
    assert fixed.generate(vectors, max_new_tokens=2).injection_scale == 5.0


def test_depth_template_prompt_shows_the_depth(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen, av_template=DEPTH_AV_TEMPLATE)
    nla = NLA.from_pretrained(av_dir, ar_dir)
    pct = depth_percent(K, qwen.model.config.num_hidden_layers)
    assert nla.depth_pct == pct
    assert f"depth {pct}% of the network" in nla.av_tokenizer.decode(nla.prompt_ids)
    assert nla.generate(_vectors(2, qwen.d_model), max_new_tokens=2).injections_applied == 2


def test_wrong_width_is_one_clear_error(tmp_path, qwen):
    nla = NLA.from_pretrained(*make_pair(tmp_path, qwen))
    with pytest.raises(InferenceError, match=rf"vectors shape.*\[n, {qwen.d_model}\].*\[3, 10\]"):
        nla.explain(torch.zeros(3, 10))
    with pytest.raises(InferenceError, match="NaN or inf"):
        nla.explain(torch.full((1, qwen.d_model), float("nan")))


def test_mismatched_pair_names_the_field(tmp_path, qwen):
    av_dir, _ = make_pair(tmp_path / "a", qwen)
    _, other_ar = make_pair(tmp_path / "b", qwen, ar_layer=1)
    with pytest.raises(InferenceError, match="extraction_layer_index is 2 in the AV.*1 in the AR"):
        NLA.from_pretrained(av_dir, other_ar)
    _, ar_dir = make_pair(tmp_path / "c", qwen)
    with pytest.raises(InferenceError, match="role"):
        NLA.from_pretrained(ar_dir, av_dir)  # swapped


def test_pairs_match_on_the_models_not_the_recorded_path(tmp_path, qwen, tiny_models):
    """The reference's stages record different base_checkpoint paths for the AV and the AR."""
    av_dir, ar_dir = make_pair(tmp_path / "a", qwen)
    _edit_sidecar(av_dir, "base_checkpoint", "/scratch/av_sft/qwen2.5-7b")
    _edit_sidecar(ar_dir, "base_checkpoint", "Qwen/Qwen2.5-7B-Instruct")
    NLA.from_pretrained(av_dir, ar_dir)
    # Another base model is refused whatever the sidecars say: here a Llama AR of the same width
    # and layer whose sidecar records no tokens (derived from its own tokenizer, so valid).
    _, llama_ar = make_pair(tmp_path / "b", tiny_models["llama"])
    data = yaml.safe_load((llama_ar / "nla_meta.yaml").read_text(encoding="utf-8"))
    del data["tokens"]
    (llama_ar / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(InferenceError, match="base models differ: config model_type is 'qwen2'.*'llama'"):
        NLA.from_pretrained(av_dir, llama_ar)


def test_sidecar_tokenizer_mismatch_is_refused(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen)
    live = read_model_sidecar(av_dir).tokens.token_id
    _edit_sidecar(av_dir, "tokens.injection_token_id", live + 1)
    _edit_sidecar(ar_dir, "tokens.injection_token_id", live + 1)
    with pytest.raises(SidecarError, match="tokens.injection_token_id"):
        NLA.from_pretrained(av_dir, ar_dir)


def test_other_engines_need_a_factory(tmp_path, qwen):
    with pytest.raises(InferenceError, match="engine_factory"):
        NLA.from_pretrained(*make_pair(tmp_path, qwen), engine="vllm")


def _released_sidecar(fixture: str, tiny, layers: int) -> dict:
    """A released sidecar (spellings, extra keys, key order kept) with the tiny model's numbers."""
    data = yaml.safe_load((FIXTURES / fixture).read_text(encoding="utf-8"))
    tok, char = tiny.tokenizer, "\u320e"
    templates = data["prompt_templates"]
    av_t = templates.get("av", templates.get("actor"))
    ar_t = templates.get("ar", templates.get("critic"))
    meta = make_token_meta(tok, av_t, ar_t, char)
    data["d_model"] = tiny.d_model
    data["tokens"].update(injection_char=char, injection_token_id=marker_token_id(tok, char),
                          injection_left_neighbor_id=meta.left_id,
                          injection_right_neighbor_id=meta.right_id,
                          critic_suffix_ids=critic_suffix_ids(tok, ar_t))
    if isinstance(data["extraction"].get("mse_scale"), float):
        data["extraction"]["mse_scale"] = tiny.d_model ** 0.5
    for key in ("extraction_layer_index", "layer"):
        if key in data:
            data[key] = K
    critic = data.get("critic") or {}
    if "extraction_layer_index" in critic:
        critic["extraction_layer_index"] = K
    if "num_hidden_layers" in critic:
        critic["num_hidden_layers"] = K + 1
    return data


@pytest.mark.parametrize("family,av_fixture,ar_fixture", [
    ("qwen2", "qwen2.5-7b-L20-av.yaml", "qwen2.5-7b-L20-critic-v1.yaml"),
    ("gemma3", "gemma3-12b-L32-av.yaml", "gemma3-12b-L32-ar.yaml"),
])
def test_loads_directories_laid_out_like_the_releases(tmp_path, tiny_models, family, av_fixture,
                                                      ar_fixture):
    tiny = tiny_models[family]
    av_dir, ar_dir = make_pair(tmp_path, tiny)
    layers = tiny.model.config.num_hidden_layers
    for directory, fixture in ((av_dir, av_fixture), (ar_dir, ar_fixture)):
        data = _released_sidecar(fixture, tiny, layers)
        (directory / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True,
                                                                sort_keys=False), encoding="utf-8")
    nla = NLA.from_pretrained(av_dir, ar_dir)
    released = yaml.safe_load((FIXTURES / av_fixture).read_text(encoding="utf-8"))
    assert nla.injection.scale == released["extraction"]["injection_scale"]
    result = nla.score(_vectors(3, tiny.d_model), max_new_tokens=4)
    assert result.injections_applied == 3 and result.predictions.shape == (3, tiny.d_model)
    assert torch.isfinite(result.mse).all()
