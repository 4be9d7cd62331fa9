"""The recipe loader: strict keys and types, overrides, value checks, dump/redaction, describe."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from nla_rl.config import (REDACTED, RecipeConfig, describe, dump_recipe, load_recipe, param,
                           recipe_from_dict, recipe_to_dict, redact)
from nla_rl.errors import ConfigError

TINY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def _dotted_keys(cls: type, prefix: str = ""):
    """Every (dotted key, field, owning class) of a config dataclass tree."""
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", f, cls
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _dotted_keys(tp, f"{prefix}{f.name}.")


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- loading


def test_tiny_recipe_loads_with_its_values():
    cfg = load_recipe(TINY_RECIPE)
    assert cfg.model.base == "toyworld" and cfg.model.layer_index == 1
    assert cfg.data.corpus == "toyworld" and cfg.data.teacher.kind == "toyworld"
    assert cfg.run.stages == ("prepare", "datagen", "check", "ar_sft", "av_sft", "rl", "export",
                              "eval")  # the whole pipeline
    assert cfg.rl.group_size == 8 and cfg.rl.max_new_tokens == 48 and cfg.rl.ar_ema_decay == 0.9
    assert cfg.engine.kind == "vllm" and cfg.learner.backend == "fsdp2"
    assert (cfg.learner.ranks_av, cfg.learner.ranks_ar) == (2, 2)
    assert cfg.learner.num_cpus_per_rank == 0.5
    assert cfg.wandb.enabled is False
    assert cfg.run.dir == "runs/tiny"  # resolved from the name
    assert cfg.ar_sft.lr == pytest.approx(3e-4) and isinstance(cfg.ar_sft.lr, float)
    hash(cfg)  # frozen all the way down (tuples, not lists)


def test_every_field_is_documented():
    keys = list(_dotted_keys(RecipeConfig))
    assert len(keys) > 80
    undocumented = [key for key, f, _ in keys if not f.metadata.get("doc", "").strip()]
    assert undocumented == []


def test_describe_lists_every_key_with_its_doc():
    text = describe()
    for key, f, _ in _dotted_keys(RecipeConfig):
        assert f"{key}:" in text, key
        assert f.metadata["doc"] in text, key
    assert "rl.group_size: int (>= 2) = 4" in text
    assert "injection.scale: float or null (> 0) = null" in text


def test_exponent_floats_without_a_dot_are_floats():
    # PyYAML (YAML 1.1) reads `1e-5` as a string; the loader accepts it for float fields.
    cfg = recipe_from_dict({"rl": {"av_lr": "1e-5"}}, ["rl.ar_lr=2e-5"])
    assert cfg.rl.av_lr == 1e-5 and cfg.rl.ar_lr == 2e-5


# ------------------------------------------------------------------------ unknown keys, types


def test_unknown_top_level_key_suggests_the_section():
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"engin": {"kind": "hf"}})
    message = str(err.value)
    assert "unknown key 'engin'" in message and "did you mean 'engine'?" in message
    assert "wandb" in message  # the valid keys are listed


def test_unknown_nested_key_names_full_path_and_suggests(tmp_path):
    path = _write(tmp_path, {"data": {"splits": {"evl": 0.1}}})
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'data.splits.evl'" in message
    assert "did you mean 'data.splits.eval'?" in message
    assert "av_sft, ar_sft, rl, eval" in message


def test_wrong_type_names_key_expected_and_found():
    with pytest.raises(ConfigError, match=r"rl\.group_size: expected int, found str 'eight'"):
        recipe_from_dict({"rl": {"group_size": "eight"}})


def test_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"rl: expected a mapping of keys, found int 3"):
        recipe_from_dict({"rl": 3})


@pytest.mark.parametrize("section, key, value, expected", [
    ("rl", "group_size", True, "expected int, found bool True"),
    ("wandb", "enabled", 1, "expected bool, found int 1"),
    ("wandb", "enabled", "yes", "expected bool, found str 'yes'"),
    ("rl", "temperature", False, "expected float, found bool False"),
    ("learner", "zero_stage", True, "expected one of 2|3, found bool True"),
])
def test_bool_and_int_are_not_confused(section, key, value, expected):
    with pytest.raises(ConfigError, match=f"{section}.{key}: {expected}"):
        recipe_from_dict({section: {key: value}})


def test_int_is_accepted_for_float():
    cfg = recipe_from_dict({"rl": {"temperature": 1}})
    assert cfg.rl.temperature == 1.0 and type(cfg.rl.temperature) is float


def test_literal_violation_lists_choices_and_suggests():
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({"model": {"dtype": "bfloat61"}})
    message = str(err.value)
    assert "model.dtype: expected one of 'float32'|'bfloat16'|'float16'" in message
    assert "did you mean 'bfloat16'?" in message


def test_literal_inside_a_tuple_is_checked():
    with pytest.raises(ConfigError, match=r"run\.stages\[1\]: expected one of"):
        recipe_from_dict({"run": {"stages": ["rl", "exprot"]}})


# ------------------------------------------------------------------------------- overrides


def test_overrides_nested_list_bool_and_null():
    cfg = load_recipe(TINY_RECIPE, [
        "rl.steps=10", "data.splits.rl=0.3", "data.splits.eval=0.2", "run.stages=[rl,export]",
        "wandb.enabled=true", "data.num_docs=null", "injection.scale=150", "learner.lora_rank=32",
    ])
    assert cfg.rl.steps == 10
    assert (cfg.data.splits.rl, cfg.data.splits.eval) == (0.3, 0.2)
    assert cfg.run.stages == ("rl", "export")
    assert cfg.wandb.enabled is True
    assert cfg.data.num_docs is None
    assert cfg.injection.scale == 150.0
    assert cfg.learner.lora_rank == 32


def test_override_of_a_section_missing_from_the_file(tmp_path):
    cfg = load_recipe(_write(tmp_path, {"run": {"name": "x"}}), ["negatives.enabled=true"])
    assert cfg.negatives.enabled is True and cfg.run.dir == "runs/x"


@pytest.mark.parametrize("override, pattern", [
    ("rl.grup_size=8", r"unknown key 'rl.grup_size'; did you mean 'rl.group_size'\?"),
    ("rll.steps=8", r"unknown key 'rll'; did you mean 'rl'\?"),
    ("rl=3", r"rl is a section, not a value"),
    ("data.splits=0.5", r"data.splits is a section, not a value"),
    ("rl.steps", r"expected key.sub=value"),
    ("=3", r"expected key.sub=value"),
    ("rl.steps.inner=1", r"rl.steps is a value"),
    ("rl.steps=ten", r"rl.steps: expected int, found str 'ten'"),
])
def test_bad_overrides_are_refused_clearly(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_recipe(TINY_RECIPE, [override])


# ---------------------------------------------------------------------------- value checks


def test_whiten_needs_the_centre_and_a_lambda_of_at_least_zero():
    assert load_recipe(TINY_RECIPE, ["injection.whiten=0.5"]).injection.whiten == 0.5
    with pytest.raises(ConfigError, match=r"injection\.whiten: .*needs injection\.centre: true"):
        load_recipe(TINY_RECIPE, ["injection.centre=false", "injection.whiten=0.5"])
    with pytest.raises(ConfigError, match=r"injection\.whiten"):
        load_recipe(TINY_RECIPE, ["injection.whiten=-1"])
    assert load_recipe(TINY_RECIPE, ["injection.centre=false",
                                     "injection.whiten=null"]).injection.whiten is None


def test_splits_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"data\.splits: av_sft \+ ar_sft \+ rl \+ eval must sum"):
        recipe_from_dict({"data": {"splits": {"av_sft": 0.5, "ar_sft": 0.5, "rl": 0.5}}})
    ok = recipe_from_dict({"data": {"splits": {"av_sft": 0.25, "ar_sft": 0.25, "rl": 0.5,
                                               "eval": 0.0}}})
    assert ok.data.splits.rl == 0.5


def test_add_family_refuses_a_scale():
    with pytest.raises(ConfigError, match=r"injection\.scale: must be null for family 'add'"):
        recipe_from_dict({"injection": {"family": "add", "scale": 150}})
    assert recipe_from_dict({"injection": {"family": "add"}}).injection.scale is None


@pytest.mark.parametrize("override, pattern", [
    ("rl.top_p=0", r"rl\.top_p: must be > 0 and <= 1, found 0"),
    ("rl.top_p=1.5", r"rl\.top_p: must be > 0 and <= 1, found 1.5"),
    ("rl.temperature=.nan", r"rl\.temperature: expected a finite float"),
    ("data.splits.rl=-0.1", r"data\.splits\.rl: must be >= 0"),
    ("data.min_pos=500", r"data\.min_pos: must be < max_tokens"),
    ("learner.lora_dropout=1", r"learner\.lora_dropout: must be >= 0 and < 1"),
    ("ar_sft.lr=0", r"ar_sft\.lr: must be > 0"),
    ("model.layer_index=-1", r"model\.layer_index: must be >= 0"),
    ("rl.group_size=1", r"rl\.group_size: must be >= 2"),
    ("model.base=tiny:gpt2", r"model\.base: unknown tiny family 'gpt2'"),
    ("av_sft.batch_size=12", r"av_sft\.batch_size: must be a multiple of micro_batch_size"),
    ("negatives.per_sample=30", r"negatives\.per_sample: must be <= top_k"),
    ("run.stages=[rl,datagen]", r"run\.stages: must list each stage once, in the pipeline order"),
    ("run.stages=[rl,rl]", r"run\.stages: must list each stage once"),
    ("wandb.api_key_env=sk-123", r"wandb\.api_key_env: must be an environment variable name"),
    ("templates.av=no marker here", r"templates\.av: must contain \{injection_char\}"),
])
def test_value_checks(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_recipe(TINY_RECIPE, [override])


# ------------------------------------------------------------------------- dump and redaction


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_recipe(TINY_RECIPE, ["injection.scale=150", "run.stages=[datagen,rl]",
                                    "wandb.entity=team"])
    path = dump_recipe(cfg, tmp_path / "out" / "recipe.yaml")
    assert load_recipe(path) == cfg
    assert recipe_from_dict(recipe_to_dict(cfg)) == cfg
    assert recipe_from_dict(recipe_to_dict(RecipeConfig())) == RecipeConfig()


@dataclass(frozen=True)
class _Credentials:
    token: str | None = param(None, "An API token.", secret=True)
    user: str = param("alice", "Who.")


@dataclass(frozen=True)
class _WithSecret:
    recipe: RecipeConfig = param(factory=RecipeConfig, doc="The recipe.")
    creds: _Credentials = param(factory=_Credentials, doc="Credentials.")


def test_secret_fields_are_redacted(tmp_path):
    obj = _WithSecret(creds=_Credentials(token="tok-abc-123456789"))
    path = dump_recipe(obj, tmp_path / "r.yaml")
    raw = path.read_bytes()
    assert b"tok-abc-123456789" not in raw and REDACTED.encode() in raw
    assert yaml.safe_load(raw)["creds"] == {"token": REDACTED, "user": "alice"}
    # A null secret stays null: there is nothing to hide and null keeps its meaning.
    assert redact(_WithSecret())["creds"]["token"] is None


def test_env_secret_values_are_redacted(tmp_path, monkeypatch):
    secret = "s3cr3t-planted-value"
    monkeypatch.setenv("MY_SERVICE_TOKEN", secret)
    monkeypatch.setenv("PLAIN_SETTING_VAR", "visible-value-xyz")
    monkeypatch.setenv("SHORT_KEY", "abc")  # too short to redact safely
    cfg = load_recipe(TINY_RECIPE, [f"wandb.project=proj-{secret}",
                                    "run.name=abc-visible-value-xyz"])
    raw = dump_recipe(cfg, tmp_path / "r.yaml").read_bytes()
    assert secret.encode() not in raw
    assert f"proj-{REDACTED}".encode() in raw
    assert b"abc-visible-value-xyz" in raw
    assert redact({"a": [f"x{secret}"]}) == {"a": [f"x{REDACTED}"]}


def test_dump_is_atomic_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    dump_recipe(RecipeConfig(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        dump_recipe(load_recipe(TINY_RECIPE, ["rl.steps=99"]), path)
    assert path.read_bytes() == before  # the old file is intact, not half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_the_ars_own_teacher_is_a_probability():
    assert load_recipe(TINY_RECIPE, ["toyworld.ar_p_include=0.8"]).toyworld.ar_p_include == 0.8
    with pytest.raises(ConfigError, match=r"toyworld\.ar_p_include"):
        load_recipe(TINY_RECIPE, ["toyworld.ar_p_include=0"])
    with pytest.raises(ConfigError, match=r"toyworld\.ar_p_include"):
        load_recipe(TINY_RECIPE, ["toyworld.ar_p_include=1.5"])


def test_the_ars_own_api_or_local_teacher_is_checked():
    """data.ar_teacher: `same` by default; a real kind needs its model; it and the toy world's
    own AR teacher (toyworld.ar_p_include) cannot both re-explain the AR-SFT split."""
    assert load_recipe(TINY_RECIPE).data.ar_teacher.kind == "same"
    real = ["data.ar_teacher.kind=openai", "toyworld.ar_p_include=null"]
    with pytest.raises(ConfigError, match=r"data\.ar_teacher\.model: must name the teacher model"):
        load_recipe(TINY_RECIPE, real)
    cfg = load_recipe(TINY_RECIPE, [*real, "data.ar_teacher.model=gpt-ar"])
    assert (cfg.data.ar_teacher.kind, cfg.data.ar_teacher.model) == ("openai", "gpt-ar")
    assert cfg.data.ar_teacher.key_env == "OPENAI_API_KEY"
    with pytest.raises(ConfigError, match=r"data\.ar_teacher\.kind: re-explains the AR-SFT split, "
                                          r"and so does toyworld\.ar_p_include"):
        load_recipe(TINY_RECIPE, ["data.ar_teacher.kind=openai", "data.ar_teacher.model=gpt-ar"])
    with pytest.raises(ConfigError, match=r"data\.ar_teacher\.kind: expected one of 'same'"):
        load_recipe(TINY_RECIPE, ["data.ar_teacher.kind=toyworld"])


def test_a_teacher_prompt_must_say_where_the_text_goes():
    cfg = load_recipe(TINY_RECIPE, ['data.teacher.prompt="Name every feature of: {prefix}"'])
    assert cfg.data.teacher.prompt == "Name every feature of: {prefix}"
    for section in ("teacher", "ar_teacher"):
        with pytest.raises(ConfigError, match=rf"data\.{section}\.prompt: must contain {{prefix}}"):
            load_recipe(TINY_RECIPE, [f"data.{section}.prompt=Name every feature"])
