"""Loading, and being loaded by, the published NLA code: BOS conventions of the tiny tokenizers,
transformers-4.x fields, minimal (reference-style) and nanoNLA-layout sidecars, pair matching and
``nla-rl sidecar check``. Every pair here is written by the test itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from launch.cli import main
from nla_rl.compat import (PORTABLE_TOKENIZER_CLASS, TokenizerContractError, check_bos_contract,
                           make_portable, portable_config, same_base_problem, v4_rope_fields)
from nla_rl.errors import SidecarError
from nla_rl.inference import NLA
from nla_rl.sidecar import read_model_sidecar
from nla_rl.testing.tiny import FAMILIES, build_tiny_tokenizer
from tests.unit.test_inference import K, make_pair

AV_TEMPLATE_KEY = "actor"  # the reference's older spelling, which its client still reads


def _vectors(n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 3


def _write(directory: Path, data: dict) -> None:
    (directory / "nla_meta.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False),
                                             encoding="utf-8")


def _read(directory: Path) -> dict:
    return yaml.safe_load((directory / "nla_meta.yaml").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- BOS conventions

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_adds_exactly_the_bos_it_declares(tmp_path, family):
    tok = build_tiny_tokenizer(family, tmp_path)
    check_bos_contract(tok, tmp_path)
    plain = tok("x", add_special_tokens=False)["input_ids"]
    special = tok("x", add_special_tokens=True)["input_ids"]
    if family.startswith("qwen"):  # Qwen2.5/Qwen3: no BOS token at all
        assert tok.bos_token is None and special == plain
    else:  # Llama-3 / Gemma-3: BOS declared and added
        assert tok.bos_token is not None and special == [tok.bos_token_id] + plain
    # What the reference critic asserts before it reconstructs anything.
    assert tok.bos_token_id is None or special[0] == tok.bos_token_id


def test_a_declared_bos_that_is_never_added_is_refused(tmp_path):
    from transformers import AutoTokenizer

    build_tiny_tokenizer("qwen2", tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["bos_token"] = "<|endoftext|>"  # the old tiny Qwen tokenizer's promise
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerContractError, match=r"declares bos_token '<\|endoftext\|>'.*declare no "
                                                     r"BOS token.*or make the tokenizer add it"):
        check_bos_contract(tok, tmp_path)


# ----------------------------------------------------------------------------- transformers 4.x fields

# config.json fragments as transformers 5 writes them for the presets' base models, and the fields
# transformers 4.x reads for the same model.
PRESET_CONFIGS = {
    "qwen2.5-7b": ({"model_type": "qwen2", "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
                   {"rope_theta": 1e6, "rope_scaling": None}),
    "gemma3-12b": ({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}},
        {"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
         "rope_local_base_freq": 10000.0}),
    "llama-3.3-70b": ({"model_type": "llama", "rope_parameters": {
        "rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}}),
}


@pytest.mark.parametrize("preset", sorted(PRESET_CONFIGS))
def test_v4_rope_fields_of_the_presets(preset):
    v5, v4 = PRESET_CONFIGS[preset]
    assert v4_rope_fields(v5) == v4
    multimodal = portable_config({"model_type": "gemma3", "text_config": v5})
    assert {k: multimodal["text_config"][k] for k in v4} == v4
    assert portable_config({"model_type": "x"}) == {"model_type": "x"}  # nothing to add


def test_portable_files_load_the_same_in_transformers_5(tmp_path, qwen):
    from transformers import AutoConfig, AutoTokenizer

    shutil.copytree(qwen.path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"]["rope_theta"] = 1e6  # a Qwen2.5-like base
    (tmp_path / "m" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    before = AutoConfig.from_pretrained(tmp_path / "m").rope_parameters
    make_portable(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text(encoding="utf-8"))
    assert written["rope_theta"] == 1e6 and written["rope_scaling"] is None
    assert AutoConfig.from_pretrained(tmp_path / "m").rope_parameters == before
    tok_config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok("the red cat")["input_ids"] == qwen.tokenizer("the red cat")["input_ids"]


# ----------------------------------------------------------------------------- sidecar defaults

def test_absent_trained_on_and_parent_checkpoints_read_as_empty(tmp_path, qwen):
    av_dir, _ = make_pair(tmp_path, qwen)
    data = _read(av_dir)
    del data["trained_on"], data["parent_checkpoints"]
    _write(av_dir, data)
    sc = read_model_sidecar(av_dir)
    assert sc.trained_on == () and sc.parent_checkpoints == () and not sc.notes


# ----------------------------------------------------------------------------- a reference-layout pair

def _reference_minimal_pair(root: Path, tiny) -> tuple[Path, Path]:
    """A pair whose sidecars hold only what the reference clients read: the AV's template (old
    spelling), width and scale; the AR's role, MSE scale and template. Different base paths."""
    av_dir, ar_dir = make_pair(root, tiny)
    av, ar = _read(av_dir), _read(ar_dir)
    _write(av_dir, {"kind": "nla_model", "d_model": av["d_model"],
                    "extraction": {"injection_scale": av["extraction"]["injection_scale"]},
                    "prompt_templates": {AV_TEMPLATE_KEY: av["prompt_templates"]["av"]}})
    _write(ar_dir, {"kind": "nla_model", "role": "critic", "base_checkpoint": "/scratch/ar_sft/final",
                    "extraction": {"mse_scale": ar["extraction"]["mse_scale"]},
                    "prompt_templates": {"ar": ar["prompt_templates"]["ar"]}})
    return av_dir, ar_dir


def test_minimal_reference_sidecars_are_completed_from_the_checkpoint(tmp_path, qwen):
    full_av, full_ar = make_pair(tmp_path / "full", qwen)
    av_dir, ar_dir = _reference_minimal_pair(tmp_path / "minimal", qwen)
    av, ar = read_model_sidecar(av_dir), read_model_sidecar(ar_dir)
    full = read_model_sidecar(full_av), read_model_sidecar(full_ar)
    assert av.marker == full[0].marker  # the marker, its id and neighbours, from the tokenizer
    assert ar.tokens.critic_suffix_ids == full[1].tokens.critic_suffix_ids
    assert ar.extraction_layer_index == K and ar.av_template is None  # K from the AR's blocks
    assert (av.role, av.stage, av.base_checkpoint) == ("av", "unknown", "unknown")
    assert {"schema_version", "role", "stage", "base_checkpoint", "tokens.injection_char",
            "tokens.injection_token_id", "tokens.injection_left_neighbor_id"} <= av.derived
    assert {"critic.extraction_layer_index", "tokens.critic_suffix_ids"} <= ar.derived
    assert any("filled role = 'av'" in n for n in av.notes)
    # It loads and scores exactly like the pair with complete sidecars.
    vectors = _vectors(3, qwen.d_model)
    got = NLA.from_pretrained(av_dir, ar_dir).score(vectors, max_new_tokens=4)
    ref = NLA.from_pretrained(full_av, full_ar).score(vectors, max_new_tokens=4)
    assert got.texts == ref.texts and torch.equal(got.predictions, ref.predictions)


def test_what_cannot_be_known_is_still_refused(tmp_path, qwen):
    av_dir, _ = _reference_minimal_pair(tmp_path, qwen)
    data = _read(av_dir)
    del data["prompt_templates"]
    _write(av_dir, data)
    with pytest.raises(SidecarError, match=r"missing required field `prompt_templates\.av`"):
        read_model_sidecar(av_dir)
    data["prompt_templates"] = {"av": "x {injection_char}"}
    del data["extraction"]
    _write(av_dir, data)
    with pytest.raises(SidecarError, match=r"missing required field `extraction`"):
        read_model_sidecar(av_dir)


# ----------------------------------------------------------------------------- a nanoNLA-layout pair

def _nano_pair(root: Path, tiny) -> tuple[Path, Path]:
    """A pair laid out like nanoNLA's checkpoints: each directory carries a copy of its dataset
    sidecar (``kind: nla_dataset``), which records no role and no injection family."""
    av_dir, ar_dir = make_pair(root, tiny, family="add")
    meta = _read(av_dir)
    dataset = {
        "dataset_id": "tiny-L2-av_sft", "stage": "av_sft", "row_count": 100,
        "extraction": {"base_model": "Qwen/Qwen3-8B", "d_model": meta["d_model"], "layer_index": K,
                       "norm": "none", "corpus": "toy", "positions_per_doc": 1},
        "kind": "nla_dataset", "schema_version": 1, "tokens": meta["tokens"],
        "prompt_templates": {"actor": meta["prompt_templates"]["av"],
                             "critic": meta["prompt_templates"]["ar"]},
    }
    _write(av_dir, dataset)
    _write(ar_dir, {**dataset, "extraction": {**dataset["extraction"], "mse_scale": meta["extraction"]["mse_scale"]}})
    return av_dir, ar_dir


def test_nanonla_layout_needs_its_family_and_then_matches_a_recorded_add_pair(tmp_path, qwen):
    recorded_av, recorded_ar = make_pair(tmp_path / "recorded", qwen, family="add")
    av_dir, ar_dir = _nano_pair(tmp_path / "nano", qwen)
    with pytest.raises(SidecarError, match=r"injection family is not recorded: this is nanoNLA's layout.*"
                                           r"injection_family='add' \(CLI: --injection-family add\)"):
        NLA.from_pretrained(av_dir, ar_dir)
    ar = read_model_sidecar(ar_dir)  # the AR injects nothing: no family needed
    assert (ar.role, ar.extraction_layer_index, ar.trained_on) == ("ar", K, ("tiny-L2-av_sft",))
    nla = NLA.from_pretrained(av_dir, ar_dir, injection_family="add")
    assert nla.injection.family == "add" and nla.av_meta.stage == "av_sft"
    vectors = _vectors(3, qwen.d_model)
    got = nla.score(vectors, max_new_tokens=4)
    ref = NLA.from_pretrained(recorded_av, recorded_ar).score(vectors, max_new_tokens=4)
    assert got.texts == ref.texts and torch.equal(got.predictions, ref.predictions)
    assert got.injections_applied == 3


def test_a_given_family_must_not_contradict_the_recorded_one(tmp_path, qwen):
    av_dir, ar_dir = make_pair(tmp_path, qwen, family="add")
    with pytest.raises(SidecarError, match="records 'add' but 'replace' was given"):
        NLA.from_pretrained(av_dir, ar_dir, injection_family="replace")
    assert NLA.from_pretrained(av_dir, ar_dir, injection_family="add").injection.family == "add"


# ----------------------------------------------------------------------------- pairs

def test_same_base_problem_names_what_differs(tiny_models):
    qwen, llama = tiny_models["qwen2"], tiny_models["llama"]
    assert same_base_problem(qwen.model.config, qwen.tokenizer, qwen.model.config, qwen.tokenizer) is None
    assert "model_type is 'qwen2'" in same_base_problem(qwen.model.config, qwen.tokenizer,
                                                        llama.model.config, llama.tokenizer)
    assert "tokenizers differ" in same_base_problem(qwen.model.config, qwen.tokenizer,
                                                    qwen.model.config, llama.tokenizer)


# ----------------------------------------------------------------------------- nla-rl sidecar check

def test_sidecar_check_says_what_it_filled_in_or_why_it_refuses(tmp_path, qwen, capsys):
    av_dir, _ = _nano_pair(tmp_path, qwen)
    assert main(["sidecar", "check", str(av_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--injection-family add" in err[0]
    assert main(["sidecar", "check", str(av_dir), "--injection-family", "add"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ok: role=av") and "injection=add" in out[0]
    assert "filled in: role = 'av' (a model directory without value_head.safetensors)" in out[0]
    assert "extraction.injection_family = 'add' (given by the caller)" in out[0]
    full_av, _ = make_pair(tmp_path / "full", qwen)
    assert main(["sidecar", "check", str(full_av)]) == 0
    assert capsys.readouterr().out.strip().endswith("; nothing filled in")
