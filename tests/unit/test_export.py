"""Export converters: checkpoints (full and LoRA AV, AR) and finished directories → verified HF
directories in the published layout; corrupted writes and bad inputs are refused, leaving nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import nla_rl.export as export
from actors.learner_models import LoraSpec, apply_lora
from launch.train import run
from nla_rl.ar_model import VALUE_HEAD_FILE, ActivationReconstructor
from nla_rl.checkpoint import CheckpointManager
from nla_rl.config import load_recipe
from nla_rl.errors import NLAError, SidecarError
from nla_rl.export import ExportError, LoraSettings
from nla_rl.injection import inject
from nla_rl.sidecar import read_model_sidecar, validate_model_sidecar, write_model_sidecar
from nla_rl.templates import av_prompt_ids
from nla_rl.tokens import find_marker_positions

ROOT = Path(__file__).resolve().parents[2]
LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
TEXTS = ["the cat sits on a red house", "a small bird"]
# Tokenizer classes transformers 4.x loads (a family class: its fast variant from tokenizer.json).
V4_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast")
FAMILIES = {"replace": ["injection.family=replace", "injection.scale=3.0"],
            "add": ["injection.family=add", "injection.add_layer=1"]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def run_dir(request, tmp_path_factory) -> Path:
    """A prepared run (init/{av,ar}) of a tiny Qwen2, one per injection family. Uncentred: a
    centred AV's centre comes from datagen, which these tests skip (its round trip through
    export: tests/unit/test_injection_centre.py, tests/e2e/test_export_stage.py)."""
    directory = tmp_path_factory.mktemp(f"export-{request.param}")
    return run(str(ROOT / "recipes" / "tiny.yaml"),
               ["run.stages=[prepare]", "model.base=tiny:qwen2", f"run.dir={directory}",
                "injection.centre=false", "injection.whiten=null", *FAMILIES[request.param]])


# ----------------------------------------------------------------------------- helpers

def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _save_checkpoint(run_dir: Path, root: Path, role: str, step: int, state: dict, *,
                     lora_rank: int = 0) -> Path:
    """A step directory exactly as LearnerGroup.save writes it (manifest, model.safetensors)."""
    cfg = load_recipe(run_dir / "recipe.yaml", [f"learner.lora_rank={lora_rank}",
                                                f"learner.lora_alpha={LORA.alpha}"])
    manager = CheckpointManager.for_recipe(root, cfg, role, keep_last=None)

    def write(staging: Path) -> None:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(staging / "model.safetensors"))
    return manager.save(step, write)


def _av_logits(model, tokenizer, meta) -> torch.Tensor:
    """Logits of the AV prompt + a completion, a fixed random vector injected per row."""
    prompt = av_prompt_ids(tokenizer, meta.av_template, meta.tokens.char)
    ids = torch.tensor([prompt + tokenizer("<explanation>\nred", add_special_tokens=False)["input_ids"]] * 2)
    vectors = torch.randn(2, meta.d_model, generator=torch.Generator().manual_seed(7))
    scale = None if meta.injection_family == "add" else meta.injection_scale
    with torch.no_grad(), inject(model.eval(), family=meta.injection_family, vectors=vectors,
                                 positions=find_marker_positions(ids, meta.marker, 2), scale=scale,
                                 layer=meta.injection_add_layer) as handle:
        logits = model(input_ids=ids).logits
    assert handle.applied == 2
    return logits


def _load_av(path: Path):
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def _assert_export_sidecar(path: Path, role: str, source: Path, step):
    meta = read_model_sidecar(path)
    config = AutoConfig.from_pretrained(path)
    validate_model_sidecar(meta, AutoTokenizer.from_pretrained(path), config, role=role)
    assert meta.stage == "export" and meta.parent_checkpoints == (str(source),)
    assert meta.training["export"]["source"] == str(source) and meta.training["export"]["step"] == step
    return meta


def _nothing_left(out_dir: Path) -> bool:
    return not out_dir.exists() and not [p for p in out_dir.parent.glob(f".{out_dir.name}.*")]


# ----------------------------------------------------------------------------- checkpoints

def test_full_av_checkpoint_exports_the_trained_weights(run_dir, tmp_path):
    init = run_dir / "init" / "av"
    model, tokenizer = _load_av(init)
    meta = read_model_sidecar(init)
    before = _av_logits(model, tokenizer, meta)
    _perturb(model, seed=1)
    expected = _av_logits(model, tokenizer, meta)
    assert (expected - before).abs().max() > 1e-2  # the perturbation matters
    step_dir = _save_checkpoint(run_dir, tmp_path / "av_sft", "av_sft", 3, model.state_dict())

    result = export.av_from_checkpoint(step_dir, init, tmp_path / "out" / "av")
    assert result.path == tmp_path / "out" / "av" and result.step == 3
    exported, exported_tok = _load_av(result.path)
    torch.testing.assert_close(_av_logits(exported, exported_tok, meta), expected, atol=1e-5, rtol=0)
    _assert_export_sidecar(result.path, "av", step_dir, 3)
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]


def test_lora_av_checkpoint_is_merged(run_dir, tmp_path):
    init = run_dir / "init" / "av"
    base, tokenizer = _load_av(init)
    meta = read_model_sidecar(init)
    before = _av_logits(base, tokenizer, meta)
    peft_model = apply_lora(base, LORA)  # the learner's own adapter code
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to 0: randomise it so the merge matters
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    state = peft_model.state_dict()
    assert any(".lora_A.default.weight" in k for k in state) and any(".base_layer.weight" in k for k in state)
    expected = _av_logits(peft_model, tokenizer, meta)
    assert (expected - before).abs().max() > 1e-2
    step_dir = _save_checkpoint(run_dir, tmp_path / "rl_av", "rl_av", 5, state, lora_rank=LORA.rank)
    settings = LoraSettings(LORA.rank, LORA.alpha, LORA.target_modules)

    result = export.av_from_checkpoint(step_dir, init, tmp_path / "av", lora=settings)
    exported, exported_tok = _load_av(result.path)
    assert not any("lora" in k or k.startswith("base_model.") for k in exported.state_dict())
    torch.testing.assert_close(_av_logits(exported, exported_tok, meta), expected, atol=1e-5, rtol=0)
    _assert_export_sidecar(result.path, "av", step_dir, 5)

    with pytest.raises(ExportError, match="LoRA-wrapped"):  # settings must be given for LoRA
        export.av_from_checkpoint(step_dir, init, tmp_path / "x")
    with pytest.raises(ExportError, match="lora_alpha"):  # and match the manifest's
        export.av_from_checkpoint(step_dir, init, tmp_path / "x",
                                  lora=dataclasses.replace(settings, alpha=16.0))
    with pytest.raises(ExportError, match="wrong shape"):  # the adapter's targets must match too
        export.av_from_checkpoint(step_dir, init, tmp_path / "x",
                                  lora=dataclasses.replace(settings, target_modules=("q_proj", "k_proj")))
    assert _nothing_left(tmp_path / "x")


def test_ar_checkpoint_exports_layout_and_predictions(run_dir, tmp_path):
    init = run_dir / "init" / "ar"
    ar = ActivationReconstructor.from_pretrained(init)
    tokenizer = AutoTokenizer.from_pretrained(init)
    meta = read_model_sidecar(init)
    before = ar.reconstruct(tokenizer, TEXTS, template=meta.ar_template)
    _perturb(ar, seed=3)
    expected = ar.reconstruct(tokenizer, TEXTS, template=meta.ar_template)
    assert (expected - before).abs().max() > 1e-2
    step_dir = _save_checkpoint(run_dir, tmp_path / "ar_sft", "ar_sft", 4, ar.state_dict())

    result = export.ar_from_checkpoint(step_dir, init, tmp_path / "ar")
    out = result.path
    assert AutoConfig.from_pretrained(out).num_hidden_layers == meta.extraction_layer_index + 1
    head = load_file(str(out / VALUE_HEAD_FILE))
    assert list(head) == ["weight"] and head["weight"].shape == (meta.d_model, meta.d_model)
    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.padding_side == "right"
    exported = ActivationReconstructor.from_pretrained(out)
    torch.testing.assert_close(exported.reconstruct(exported_tok, TEXTS, template=meta.ar_template),
                               expected, atol=1e-5, rtol=0)
    _assert_export_sidecar(out, "ar", step_dir, 4)


def test_bf16_export_reloads_exactly(run_dir, tmp_path):
    """fp32 master weights exported as bf16: the reload equals the in-memory cast bit for bit."""
    init = run_dir / "init" / "ar"
    ar = ActivationReconstructor.from_pretrained(init)
    _perturb(ar, seed=5)
    tokenizer, meta = AutoTokenizer.from_pretrained(init), read_model_sidecar(init)
    expected = ar.reconstruct(tokenizer, TEXTS, template=meta.ar_template)
    step_dir = _save_checkpoint(run_dir, tmp_path / "ar_sft", "ar_sft", 1, ar.state_dict())
    result = export.ar_from_checkpoint(step_dir, init, tmp_path / "ar", dtype=torch.bfloat16)
    assert result.dtype == "bfloat16" and result.max_abs_diff == 0.0
    exported = ActivationReconstructor.from_pretrained(result.path, dtype=torch.bfloat16)
    assert exported.value_head.weight.dtype == torch.bfloat16
    found = exported.reconstruct(tokenizer, TEXTS, template=meta.ar_template)
    torch.testing.assert_close(found, expected, atol=0.05 * float(expected.abs().max()), rtol=0)


def test_checkpoint_tensors_must_match_the_init_config(run_dir, tmp_path):
    init = run_dir / "init" / "av"
    state = _load_av(init)[0].state_dict()
    dropped = "model.layers.1.mlp.down_proj.weight"
    bad = {k: v for k, v in state.items() if k != dropped} | {"model.extra.weight": torch.zeros(2)}
    step_dir = _save_checkpoint(run_dir, tmp_path / "av_sft", "av_sft", 1, bad)
    with pytest.raises(ExportError, match=rf"missing \[{dropped}\].*unexpected \[model.extra.weight\]"):
        export.av_from_checkpoint(step_dir, init, tmp_path / "av")
    with pytest.raises(ExportError, match="plain AV but LoRA"):
        export.av_from_checkpoint(step_dir, init, tmp_path / "av",
                                  lora=LoraSettings(4, 8.0, ("q_proj",)))
    state = dict(state)
    state[dropped] = state[dropped].clone().fill_(math.nan)
    nan_dir = _save_checkpoint(run_dir, tmp_path / "av_sft", "av_sft", 2, state)
    with pytest.raises(ExportError, match=f"non-finite values in \\[{dropped}\\]"):
        export.av_from_checkpoint(nan_dir, init, tmp_path / "av")
    assert _nothing_left(tmp_path / "av")


def test_missing_or_incomplete_checkpoint_is_refused(run_dir, tmp_path):
    init = run_dir / "init" / "ar"
    with pytest.raises(ExportError, match="no such checkpoint directory"):
        export.ar_from_checkpoint(tmp_path / "step_000009", init, tmp_path / "ar")
    ar = ActivationReconstructor.from_pretrained(init)
    step_dir = _save_checkpoint(run_dir, tmp_path / "ar_sft", "ar_sft", 1, ar.state_dict())
    (step_dir / "model.safetensors").write_bytes(b"short")
    with pytest.raises(ExportError, match="damaged"):
        export.ar_from_checkpoint(step_dir, init, tmp_path / "ar")
    (step_dir / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no model.safetensors"):
        export.ar_from_checkpoint(step_dir, init, tmp_path / "ar")
    assert _nothing_left(tmp_path / "ar")


# ----------------------------------------------------------------------------- verification

def test_a_dropped_tensor_is_caught_and_nothing_is_left(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    (out / "av").mkdir(parents=True)
    (out / "av" / "previous.txt").write_text("the last good export")
    real_write = export._write_av

    def drop_one(model, tokenizer, sidecar, directory, **kwargs):
        real_write(model, tokenizer, sidecar, directory, **kwargs)
        weights = load_file(str(directory / "model.safetensors"))
        del weights["model.layers.0.mlp.up_proj.weight"]
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})

    monkeypatch.setattr(export, "_write_av", drop_one)
    with pytest.raises(ExportError, match="model.layers.0.mlp.up_proj.weight"):
        export.export_pair(run_dir / "init" / "av", run_dir / "init" / "ar", out)
    assert sorted(p.name for p in out.iterdir()) == ["av"]  # no AR, no staging directories
    assert (out / "av" / "previous.txt").read_text() == "the last good export"


def test_a_sidecar_with_another_injection_fails_verification(run_dir, tmp_path, monkeypatch):
    """The reloaded AV is probed with the *written* sidecar's injection, so a wrong one is caught."""
    real_write = export._write_av

    def other_injection(model, tokenizer, sidecar, directory, **kwargs):
        wrong = (dataclasses.replace(sidecar, injection_add_layer=0) if sidecar.injection_family == "add"
                 else dataclasses.replace(sidecar, injection_scale=2 * sidecar.injection_scale))
        real_write(model, tokenizer, wrong, directory, **kwargs)

    monkeypatch.setattr(export, "_write_av", other_injection)
    with pytest.raises(ExportError, match="verification failed: the exported AV's logits"):
        export.export_pair(run_dir / "init" / "av", run_dir / "init" / "ar", tmp_path / "export")
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


def test_a_wrong_value_head_fails_verification(run_dir, tmp_path, monkeypatch):
    real_write = export._write_ar

    def corrupt(ar, tokenizer, sidecar, directory, **kwargs):
        real_write(ar, tokenizer, sidecar, directory, **kwargs)
        head = load_file(str(directory / VALUE_HEAD_FILE))
        save_file({"weight": head["weight"] * 1.01}, str(directory / VALUE_HEAD_FILE))

    monkeypatch.setattr(export, "_write_ar", corrupt)
    with pytest.raises(ExportError, match="verification failed: the exported AR's predictions"):
        export.export_pair(run_dir / "init" / "av", run_dir / "init" / "ar", tmp_path / "export")
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


# ----------------------------------------------------------------------------- pairs

def test_export_pair_from_directories(run_dir, tmp_path):
    av, ar = export.export_pair(run_dir / "init" / "av", run_dir / "init" / "ar", tmp_path / "e")
    assert (av.path, ar.path) == (tmp_path / "e" / "av", tmp_path / "e" / "ar")
    assert av.max_abs_diff == 0.0 and ar.max_abs_diff == 0.0  # a same-dtype reload is exact
    av_meta = _assert_export_sidecar(av.path, "av", run_dir / "init" / "av", None)
    assert av_meta.injection_family == read_model_sidecar(run_dir / "init" / "av").injection_family
    _assert_export_sidecar(ar.path, "ar", run_dir / "init" / "ar", None)


def _copy_with_sidecar(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    write_model_sidecar(dst, dataclasses.replace(read_model_sidecar(src), **changes))
    return dst


def test_mismatched_pair_and_sidecar_are_refused(run_dir, tmp_path):
    av, ar = run_dir / "init" / "av", run_dir / "init" / "ar"
    # The recorded base path may differ (the reference's stages write different ones) …
    moved = _copy_with_sidecar(ar, tmp_path / "moved_ar", base_checkpoint="/scratch/ar_sft/base")
    export.export_pair(av, moved, tmp_path / "moved")
    # … but not the base model itself: here its rope base.
    other = _copy_with_sidecar(ar, tmp_path / "other_ar")
    config = json.loads((other / "config.json").read_text(encoding="utf-8"))
    config["rope_parameters"]["rope_theta"] = 1e6
    (other / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ExportError, match="base models differ: config rope_parameters"):
        export.export_pair(av, other, tmp_path / "e")
    with pytest.raises(ExportError, match="expected an AV"):
        export.export_pair(ar, av, tmp_path / "e")
    meta = read_model_sidecar(ar)
    with pytest.raises(ExportError, match="extraction_layer_index"):
        export.check_pair(read_model_sidecar(av),
                          dataclasses.replace(meta, extraction_layer_index=meta.extraction_layer_index - 1))
    tokens = dataclasses.replace(meta.tokens, token_id=meta.tokens.token_id + 1)
    wrong = _copy_with_sidecar(av, tmp_path / "wrong_av",
                               tokens=dataclasses.replace(read_model_sidecar(av).tokens,
                                                          token_id=tokens.token_id))
    with pytest.raises(SidecarError, match="injection_token_id"):
        export.export_pair(wrong, _copy_with_sidecar(ar, tmp_path / "ar2", tokens=tokens), tmp_path / "e")
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").iterdir())
    assert issubclass(ExportError, NLAError)


# ----------------------------------------------------------------------------- other readers

def test_export_is_read_alike_under_transformers_4_field_names(run_dir, tmp_path):
    """transformers 4.x (the published NLA code, older vLLM/SGLang) reads rope_theta/rope_scaling
    and cannot load the tokenizer class TokenizersBackend; the export names what both majors read."""
    av, ar = export.export_pair(run_dir / "init" / "av", run_dir / "init" / "ar", tmp_path / "e")
    for path in (av.path, ar.path):
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        v5 = AutoConfig.from_pretrained(path).rope_parameters
        assert config["rope_theta"] == v5["rope_theta"] and config["rope_scaling"] is None
        tok_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert tok_config["tokenizer_class"] in V4_TOKENIZER_CLASSES
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.bos_token is None and tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_does_not_add_its_declared_bos_is_not_exported(run_dir, tmp_path):
    av = tmp_path / "av"
    shutil.copytree(run_dir / "init" / "av", av)
    config = json.loads((av / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["bos_token"] = "<|endoftext|>"
    (av / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(SidecarError, match="declares bos_token '<\\|endoftext\\|>'.*tokenising 'x'"):
        export.export_pair(av, run_dir / "init" / "ar", tmp_path / "e")
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").iterdir())
