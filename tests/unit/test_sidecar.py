import dataclasses
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from nla_rl.errors import SidecarError
from nla_rl.sidecar import (DatasetSidecar, ModelSidecar, TokenMeta, dataset_sidecar_path,
                            make_token_meta, read_dataset_sidecar, read_model_sidecar,
                            validate_dataset_sidecar, validate_model_sidecar,
                            write_dataset_sidecar, write_model_sidecar)
from nla_rl.templates import DEFAULT_AR_TEMPLATE, DEFAULT_AV_TEMPLATE, DEPTH_AV_TEMPLATE, depth_percent
from nla_rl.testing.tiny import TINY_MARKER_CHAR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sidecars"
QWEN_SUFFIX = (1318, 29, 366, 1708, 29)
GEMMA_SUFFIX = (1005, 236813, 655, 6011, 236813)
RELEASED_MODEL_KEYS = ["kind", "schema_version", "role", "stage", "base_checkpoint", "d_model",
                       "extraction", "tokens", "prompt_templates", "trained_on",
                       "parent_checkpoints", "created_at", "created_by"]
TOKEN_KEYS = ["injection_char", "injection_token_id", "injection_left_neighbor_id",
              "injection_right_neighbor_id", "critic_suffix_ids"]


def _load(path):
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _dump(data, path):
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _edited(name, tmp_path, dotted, value=None, *, delete=True, out_name=None):
    """A copy of fixture ``name`` in tmp_path with ``dotted`` deleted (or set to ``value``)."""
    data = _load(FIXTURES / name)
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return _dump(data, tmp_path / (out_name or name))


# ---------------------------------------------------------------------------- reading fixtures


@pytest.mark.parametrize("name,role,d_model,k,char,token_id,left,right,suffix,inj,base", [
    ("qwen2.5-7b-L20-av.yaml", "av", 3584, 20, "\u320e", 149705, 29, 522, QWEN_SUFFIX, 150.0,
     "Qwen/Qwen2.5-7B-Instruct"),
    ("qwen2.5-7b-L20-ar.yaml", "ar", 3584, 20, "\u320e", 149705, 29, 522, QWEN_SUFFIX, None,
     "Qwen/Qwen2.5-7B-Instruct"),
    ("gemma3-12b-L32-av.yaml", "av", 3840, 32, "\u321c", 246566, 236813, 954, None, 80000.0,
     "google/gemma-3-12b-it"),
    ("gemma3-12b-L32-ar.yaml", "ar", 3840, 32, "\u321c", 246566, 236813, 954, GEMMA_SUFFIX, None,
     "google/gemma-3-12b-it"),
    ("qwen2.5-7b-L20-critic-v1.yaml", "ar", 3584, 20, "\u320e", 149705, 29, 522, QWEN_SUFFIX, None,
     "Qwen/Qwen2.5-7B-Instruct"),
])
def test_read_released_model_sidecars(name, role, d_model, k, char, token_id, left, right, suffix,
                                      inj, base):
    sc = read_model_sidecar(FIXTURES / name)
    assert sc.role == role
    assert sc.d_model == d_model and sc.extraction_layer_index == k
    assert sc.base_checkpoint == base
    assert sc.tokens == TokenMeta(char, token_id, left, right, suffix)
    assert sc.marker.token_id == token_id and sc.marker.left_id == left
    assert sc.injection_scale == inj
    assert sc.mse_scale == pytest.approx(math.sqrt(d_model), abs=1e-12)
    assert sc.av_template == DEFAULT_AV_TEMPLATE and sc.ar_template == DEFAULT_AR_TEMPLATE
    assert sc.injection_family == "replace"
    assert isinstance(sc.created_at, str) and sc.created_at.startswith("2025-")


def test_read_accepts_checkpoint_directory(tmp_path):
    (tmp_path / "nla_meta.yaml").write_bytes((FIXTURES / "qwen2.5-7b-L20-av.yaml").read_bytes())
    assert read_model_sidecar(tmp_path) == read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")


def test_released_av_provenance_and_unknown_keys():
    data = _load(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    assert data["layer"] == 20 and "role_aliases" in data  # extras that the reader must ignore
    sc = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    assert sc.stage == "rl" and sc.created_by == "nla-train"
    assert sc.trained_on == ("qwen2.5-7b-L20/av_sft.parquet", "qwen2.5-7b-L20/rl.parquet")
    assert sc.parent_checkpoints == ("qwen2.5-7b-L20/av_sft/final",)
    assert sc.training == {"lr": 1e-6, "loss_type": "grpo", "global_batch_size": 512}


def test_old_critic_spelling_is_normalised():
    data = _load(FIXTURES / "qwen2.5-7b-L20-critic-v1.yaml")
    assert data["role"] == "critic" and "extraction_layer_index" not in data
    assert data["critic"] == {"num_hidden_layers": 21}
    assert data["extraction"]["mse_scale"] == "sqrt_d_model"
    sc = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-critic-v1.yaml")
    assert (sc.role, sc.extraction_layer_index, sc.stage) == ("ar", 20, "ar_sft")
    assert sc.mse_scale == math.sqrt(3584)
    assert sc.created_at == "2025-03-14T09:00:00+00:00"  # an unquoted YAML timestamp stays text


@pytest.mark.parametrize("value,expected", [
    ("sqrt_d_model", math.sqrt(3584)), ("42.5", 42.5), (None, None), (7, 7.0),
])
def test_mse_scale_spellings(tmp_path, value, expected):
    path = _edited("qwen2.5-7b-L20-av.yaml", tmp_path, "extraction.mse_scale", value, delete=False)
    assert read_model_sidecar(path).mse_scale == expected


def test_absent_mse_scale_defaults_to_sqrt_d_model(tmp_path):
    path = _edited("gemma3-12b-L32-av.yaml", tmp_path, "extraction.mse_scale")
    assert read_model_sidecar(path).mse_scale == math.sqrt(3840)


def test_bad_scale_is_refused(tmp_path):
    path = _edited("qwen2.5-7b-L20-av.yaml", tmp_path, "extraction.injection_scale", "big", delete=False)
    with pytest.raises(SidecarError, match=r"extraction\.injection_scale.*'big'"):
        read_model_sidecar(path)


def test_layer_index_spellings_must_agree(tmp_path):
    path = _edited("qwen2.5-7b-L20-ar.yaml", tmp_path, "critic.extraction_layer_index", 19, delete=False)
    with pytest.raises(SidecarError, match="disagrees"):
        read_model_sidecar(path)


def test_read_dataset_fixture():
    sc = read_dataset_sidecar(FIXTURES / "rl.parquet.nla_meta.yaml")
    # Passing the data file finds the same sidecar.
    assert read_dataset_sidecar(FIXTURES / "rl.parquet") == sc
    assert (sc.dataset_id, sc.stage, sc.row_count) == ("qwen2.5-7b-L20-rl-fineweb", "rl", 65536)
    assert (sc.base_model, sc.d_model, sc.layer_index) == ("Qwen/Qwen2.5-7B-Instruct", 3584, 20)
    assert (sc.norm, sc.corpus, sc.corpus_slice, sc.positions_per_doc) == (
        "none", "HuggingFaceFW/fineweb", (200000, 65536), 1)
    assert sc.tokens == TokenMeta("\u320e", 149705, 29, 522, QWEN_SUFFIX)
    assert sc.av_template == DEFAULT_AV_TEMPLATE and sc.ar_template == DEFAULT_AR_TEMPLATE
    assert sc.api_summaries["max_tokens"] == 256
    assert sc.parent_datasets == ("qwen2.5-7b-L20-base-fineweb",)
    assert sc.keep_debug_metadata is False and sc.git_commit.startswith("0123")
    assert sc.extras == {"stats": {"dropped_rows": {"no_explanation": 12, "too_long": 3}}}


def test_dataset_reads_av_ar_template_spelling(tmp_path):
    data = _load(FIXTURES / "rl.parquet.nla_meta.yaml")
    data["prompt_templates"] = {"av": "A {injection_char} B", "ar": "x {explanation} y z"}
    sc = read_dataset_sidecar(_dump(data, tmp_path / "rl.parquet.nla_meta.yaml"))
    assert (sc.av_template, sc.ar_template) == ("A {injection_char} B", "x {explanation} y z")


def test_dataset_sidecar_path():
    assert dataset_sidecar_path("runs/x/data/rl.parquet") == Path("runs/x/data/rl.parquet.nla_meta.yaml")
    assert dataset_sidecar_path("a/rl.parquet.nla_meta.yaml") == Path("a/rl.parquet.nla_meta.yaml")


# ---------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.yaml")
                                        if not p.name.endswith(".nla_meta.yaml")))
def test_model_round_trip(tmp_path, name):
    sc = read_model_sidecar(FIXTURES / name)
    path = write_model_sidecar(tmp_path / "ckpt", sc)
    assert path == tmp_path / "ckpt" / "nla_meta.yaml"
    assert read_model_sidecar(tmp_path / "ckpt") == sc


def test_written_model_layout_is_the_released_one(tmp_path):
    sc = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-critic-v1.yaml")  # old spelling in
    write_model_sidecar(tmp_path, sc)
    text = (tmp_path / "nla_meta.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    assert list(data) == RELEASED_MODEL_KEYS + ["critic", "extraction_layer_index"]
    assert "role: ar\n" in text and "\u320e" in text  # new spelling out, marker readable
    assert data["schema_version"] == 2
    assert list(data["prompt_templates"]) == ["av", "ar"]
    assert list(data["extraction"]) == ["injection_scale", "mse_scale"]
    assert data["extraction"]["injection_scale"] is None
    assert list(data["tokens"]) == TOKEN_KEYS
    assert data["critic"] == {"extraction_layer_index": 20} and data["extraction_layer_index"] == 20


def test_written_av_layout(tmp_path):
    sc = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    write_model_sidecar(tmp_path, sc)
    data = _load(tmp_path / "nla_meta.yaml")
    assert list(data) == RELEASED_MODEL_KEYS + ["training", "extraction_layer_index"]
    assert data["role"] == "av" and data["extraction"]["injection_scale"] == 150.0
    # The released fixture minus the unknown extras is exactly what we write.
    released = _load(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    del released["layer"], released["role_aliases"]
    assert data == released


def test_add_injection_family_round_trips(tmp_path):
    base = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    sc = dataclasses.replace(base, injection_family="add", injection_scale=None,
                             injection_add_layer=1, injection_add_coeff=0.5)
    write_model_sidecar(tmp_path, sc)
    data = _load(tmp_path / "nla_meta.yaml")
    assert data["extraction"] == {"injection_scale": None, "mse_scale": base.mse_scale,
                                  "injection_family": "add", "injection_layer": 1,
                                  "injection_coeff": 0.5}
    assert read_model_sidecar(tmp_path) == sc
    assert base.injection_family == "replace"  # absent = replace


def test_dataset_round_trip_and_layout(tmp_path):
    sc = read_dataset_sidecar(FIXTURES / "rl.parquet.nla_meta.yaml")
    path = write_dataset_sidecar(tmp_path / "rl.parquet", sc)
    assert path == tmp_path / "rl.parquet.nla_meta.yaml"
    assert read_dataset_sidecar(tmp_path / "rl.parquet") == sc
    assert _load(path) == _load(FIXTURES / "rl.parquet.nla_meta.yaml")
    assert list(_load(path)) == list(_load(FIXTURES / "rl.parquet.nla_meta.yaml"))


def test_dataset_drops_none_and_round_trips_extras(tmp_path):
    sc = DatasetSidecar(dataset_id="tiny-base", stage="base", row_count=10, base_model="tiny",
                        d_model=64, layer_index=2, corpus="toy", positions_per_doc=4,
                        extras={"centering": {"file": "mean.npy"}, "stats": {"dropped": 1}})
    path = write_dataset_sidecar(tmp_path / "base.parquet", sc)
    data = _load(path)
    for key in ("tokens", "prompt_templates", "api_summaries", "git_commit", "keep_debug_metadata"):
        assert key not in data
    assert "corpus_slice" not in data["extraction"]
    assert list(data)[-2:] == ["centering", "stats"]
    back = read_dataset_sidecar(path)
    assert back == sc and back.tokens is None


def test_dataset_stage_requirements(qwen):
    tm = make_token_meta(qwen.tokenizer, DEFAULT_AV_TEMPLATE, None)
    common = dict(dataset_id="d", row_count=1, base_model="tiny", d_model=64, layer_index=2,
                  corpus="toy", positions_per_doc=1)
    with pytest.raises(SidecarError, match=r"^tokens is required"):
        DatasetSidecar(stage="rl", **common)
    with pytest.raises(SidecarError, match=r"tokens\.critic_suffix_ids is required"):
        DatasetSidecar(stage="ar_sft", tokens=tm, av_template=DEFAULT_AV_TEMPLATE,
                       ar_template=DEFAULT_AR_TEMPLATE, **common)
    with pytest.raises(SidecarError, match="stage"):
        DatasetSidecar(stage="pretrain", **common)
    with pytest.raises(SidecarError, match="extras must not reuse"):
        DatasetSidecar(stage="base", extras={"row_count": 3}, **common)
    assert DatasetSidecar(stage="eval", **common).stage == "eval"


def test_model_sidecar_constructor_checks(qwen):
    tm = make_token_meta(qwen.tokenizer, DEFAULT_AV_TEMPLATE, DEFAULT_AR_TEMPLATE)
    kw = dict(stage="sl", base_checkpoint="tiny", d_model=64, injection_scale=None, mse_scale=8.0,
              tokens=tm, av_template=DEFAULT_AV_TEMPLATE, ar_template=DEFAULT_AR_TEMPLATE)
    assert ModelSidecar(role="actor", extraction_layer_index=None, **kw).role == "av"
    with pytest.raises(SidecarError, match="role"):
        ModelSidecar(role="judge", extraction_layer_index=2, **kw)
    with pytest.raises(SidecarError, match="extraction_layer_index is required"):
        ModelSidecar(role="ar", extraction_layer_index=None, **kw)
    with pytest.raises(SidecarError, match="injection_family"):
        ModelSidecar(role="av", extraction_layer_index=2, injection_family="steer", **kw)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,dotted", [
    ("qwen2.5-7b-L20-av.yaml", "d_model"),  # no config beside the file to derive it from
    ("qwen2.5-7b-L20-av.yaml", "extraction"),
    ("qwen2.5-7b-L20-av.yaml", "extraction.injection_scale"),
    ("qwen2.5-7b-L20-av.yaml", "tokens.injection_char"),
    ("qwen2.5-7b-L20-av.yaml", "tokens.injection_token_id"),
    ("qwen2.5-7b-L20-av.yaml", "tokens.injection_left_neighbor_id"),
    ("qwen2.5-7b-L20-av.yaml", "tokens.injection_right_neighbor_id"),
    ("qwen2.5-7b-L20-av.yaml", "prompt_templates.av"),
    ("qwen2.5-7b-L20-av.yaml", "role"),
    ("qwen2.5-7b-L20-ar.yaml", "prompt_templates.ar"),
    ("qwen2.5-7b-L20-ar.yaml", "tokens.critic_suffix_ids"),
    ("qwen2.5-7b-L20-critic-v1.yaml", "critic"),
    ("rl.parquet.nla_meta.yaml", "extraction.layer_index"),
    ("rl.parquet.nla_meta.yaml", "extraction.base_model"),
    ("rl.parquet.nla_meta.yaml", "row_count"),
    ("rl.parquet.nla_meta.yaml", "dataset_id"),
    ("rl.parquet.nla_meta.yaml", "tokens.injection_token_id"),
])
def test_missing_required_field_is_named(tmp_path, name, dotted):
    path = _edited(name, tmp_path, dotted)
    reader = read_dataset_sidecar if name.endswith(".nla_meta.yaml") else read_model_sidecar
    with pytest.raises(SidecarError) as err:
        reader(path)
    msg = str(err.value)
    assert str(path) in msg
    expected = "critic.extraction_layer_index" if dotted == "critic" else dotted
    assert f"`{expected}`" in msg and "missing required field" in msg


def test_missing_layer_index_for_ar(tmp_path):
    data = _load(FIXTURES / "qwen2.5-7b-L20-ar.yaml")
    del data["critic"], data["extraction_layer_index"]
    with pytest.raises(SidecarError, match=r"missing required field `critic\.extraction_layer_index`"):
        read_model_sidecar(_dump(data, tmp_path / "nla_meta.yaml"))


def test_missing_av_template_names_old_spelling_too(tmp_path):
    data = _load(FIXTURES / "qwen2.5-7b-L20-critic-v1.yaml")
    data["role"] = "actor"
    data["extraction"]["injection_scale"] = 150.0
    del data["prompt_templates"]["actor"]
    with pytest.raises(SidecarError, match=r"`prompt_templates\.av` \(older spelling: `prompt_templates\.actor`\)"):
        read_model_sidecar(_dump(data, tmp_path / "nla_meta.yaml"))


def test_an_ar_needs_no_av_template(tmp_path):
    """The reference critic reads only its own template: an AR sidecar without the AV's loads."""
    path = _edited("qwen2.5-7b-L20-critic-v1.yaml", tmp_path, "prompt_templates.actor")
    sc = read_model_sidecar(path)
    assert sc.role == "ar" and sc.av_template is None and sc.tokens.left_id == 29
    write_model_sidecar(tmp_path / "ckpt", sc)
    assert read_model_sidecar(tmp_path / "ckpt") == sc


def test_training_stage_dataset_needs_tokens(tmp_path):
    path = _edited("rl.parquet.nla_meta.yaml", tmp_path, "tokens")
    with pytest.raises(SidecarError, match=rf"{path}.*tokens is required in a stage-rl"):
        read_dataset_sidecar(path)


def test_wrong_type_is_named(tmp_path):
    path = _edited("gemma3-12b-L32-av.yaml", tmp_path, "tokens.injection_token_id", "246566", delete=False)
    with pytest.raises(SidecarError, match=r"tokens\.injection_token_id: expected 'an integer', found '246566'"):
        read_model_sidecar(path)


def test_wrong_kind(tmp_path):
    with pytest.raises(SidecarError, match=r"kind: expected 'nla_dataset', found 'nla_model'"):
        read_dataset_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    # A dataset sidecar read as a model's is nanoNLA's layout: without a checkpoint beside it,
    # its role cannot be inferred.
    with pytest.raises(SidecarError, match=r"missing required field `role`.*not a model directory"):
        read_model_sidecar(FIXTURES / "rl.parquet.nla_meta.yaml")
    path = _edited("qwen2.5-7b-L20-av.yaml", tmp_path, "kind", "nla_modle", delete=False)
    with pytest.raises(SidecarError, match="nla_modle"):
        read_model_sidecar(path)


def test_wrong_schema_version(tmp_path):
    path = _edited("rl.parquet.nla_meta.yaml", tmp_path, "schema_version", 2, delete=False)
    with pytest.raises(SidecarError, match=r"schema_version: expected '1', found 2"):
        read_dataset_sidecar(path)
    path = _edited("qwen2.5-7b-L20-av.yaml", tmp_path, "schema_version", 3, delete=False)
    with pytest.raises(SidecarError, match=r"schema_version: expected '1 or 2', found 3"):
        read_model_sidecar(path)


def test_missing_files_say_what_writes_them(tmp_path):
    with pytest.raises(SidecarError, match=rf"no model sidecar at {tmp_path / 'nla_meta.yaml'}.*write_model_sidecar"):
        read_model_sidecar(tmp_path)
    with pytest.raises(SidecarError, match=rf"no dataset sidecar at {tmp_path / 'x.parquet.nla_meta.yaml'}.*"
                                           "write_dataset_sidecar"):
        read_dataset_sidecar(tmp_path / "x.parquet")


def test_not_a_mapping(tmp_path):
    (tmp_path / "nla_meta.yaml").write_text("- just\n- a list\n")
    with pytest.raises(SidecarError, match="must be a YAML mapping"):
        read_model_sidecar(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SidecarError, match="not valid YAML"):
        read_model_sidecar(tmp_path)


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_only_the_sidecar(tmp_path):
    sc = read_model_sidecar(FIXTURES / "gemma3-12b-L32-ar.yaml")
    write_model_sidecar(tmp_path, sc)
    write_model_sidecar(tmp_path, sc)  # overwriting is fine too
    assert os.listdir(tmp_path) == ["nla_meta.yaml"]
    write_dataset_sidecar(tmp_path / "rl.parquet", read_dataset_sidecar(FIXTURES / "rl.parquet.nla_meta.yaml"))
    assert sorted(os.listdir(tmp_path)) == ["nla_meta.yaml", "rl.parquet.nla_meta.yaml"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    old = read_model_sidecar(FIXTURES / "qwen2.5-7b-L20-av.yaml")
    write_model_sidecar(tmp_path, old)
    before = (tmp_path / "nla_meta.yaml").read_bytes()

    def boom(data, stream=None, **kw):
        stream.write("kind: nla_model\n")  # a partial write, then the failure
        raise RuntimeError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_model_sidecar(tmp_path, dataclasses.replace(old, stage="broken"))
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset_sidecar(tmp_path / "rl.parquet", read_dataset_sidecar(FIXTURES / "rl.parquet.nla_meta.yaml"))
    monkeypatch.undo()
    assert (tmp_path / "nla_meta.yaml").read_bytes() == before
    assert os.listdir(tmp_path) == ["nla_meta.yaml"]
    assert read_model_sidecar(tmp_path) == old


# ---------------------------------------------------------------------------- validation


def _sidecars(tiny, av_template=DEFAULT_AV_TEMPLATE, k=2):
    tok, cfg = tiny.tokenizer, tiny.model.config
    depth = depth_percent(k, cfg.num_hidden_layers) if "{depth_pct}" in av_template else None
    tm = make_token_meta(tok, av_template, DEFAULT_AR_TEMPLATE, depth_pct=depth)
    common = dict(stage="sl", base_checkpoint=str(tiny.path), d_model=tiny.d_model, tokens=tm,
                  av_template=av_template, ar_template=DEFAULT_AR_TEMPLATE, mse_scale=8.0)
    av = ModelSidecar(role="av", extraction_layer_index=k, injection_scale=10.0, **common)
    # The tiny model (4 blocks) stands in for an AR truncated at K = 3: K + 1 = 4 blocks.
    ar = ModelSidecar(role="ar", extraction_layer_index=cfg.num_hidden_layers - 1,
                      injection_scale=None, **common)
    return av, ar


def test_make_token_meta_selects_marker(tiny):
    tm = make_token_meta(tiny.tokenizer, DEFAULT_AV_TEMPLATE, DEFAULT_AR_TEMPLATE)
    assert tm.char == TINY_MARKER_CHAR
    assert tiny.tokenizer.encode(tm.char, add_special_tokens=False) == [tm.token_id]
    assert tm.critic_suffix_ids and make_token_meta(tiny.tokenizer, DEFAULT_AV_TEMPLATE, None).critic_suffix_ids is None


def test_valid_sidecars_pass(tiny, tmp_path):
    av, ar = _sidecars(tiny)
    cfg = tiny.model.config
    validate_model_sidecar(av, tiny.tokenizer, cfg, role="av")
    validate_model_sidecar(ar, tiny.tokenizer, cfg, role="critic")
    # Also after a trip through the disk.
    write_model_sidecar(tmp_path, ar)
    validate_model_sidecar(read_model_sidecar(tmp_path), tiny.tokenizer, cfg, role="ar")


def _tokens(sc, **kw):
    return dataclasses.replace(sc, tokens=dataclasses.replace(sc.tokens, **kw))


@pytest.mark.parametrize("field", ["tokens.injection_token_id", "tokens.injection_left_neighbor_id",
                                   "tokens.injection_right_neighbor_id", "tokens.critic_suffix_ids",
                                   "d_model", "num_hidden_layers"])
def test_each_mismatch_is_named(tiny, field):
    av, ar = _sidecars(tiny)
    t = av.tokens
    bad, good, sc = {
        "tokens.injection_token_id": (t.token_id + 1, t.token_id, _tokens(av, token_id=t.token_id + 1)),
        "tokens.injection_left_neighbor_id": (t.left_id + 1, t.left_id, _tokens(av, left_id=t.left_id + 1)),
        "tokens.injection_right_neighbor_id": (t.right_id + 1, t.right_id, _tokens(av, right_id=t.right_id + 1)),
        "tokens.critic_suffix_ids": ([7, 8], list(t.critic_suffix_ids), _tokens(ar, critic_suffix_ids=(7, 8))),
        "d_model": (4096, tiny.d_model, dataclasses.replace(av, d_model=4096)),
        "num_hidden_layers": (2, tiny.model.config.num_hidden_layers,
                              dataclasses.replace(ar, extraction_layer_index=1)),
    }[field]
    with pytest.raises(SidecarError) as err:
        validate_model_sidecar(sc, tiny.tokenizer, tiny.model.config)
    msg = str(err.value)
    assert msg.startswith(f"{field}: expected {bad!r}, found {good!r}"), msg


def test_role_mismatch(qwen):
    av, _ = _sidecars(qwen)
    with pytest.raises(SidecarError, match=r"role: expected 'ar', found 'av'"):
        validate_model_sidecar(av, qwen.tokenizer, qwen.model.config, role="critic")


def test_multi_token_marker_is_refused(qwen):
    av, _ = _sidecars(qwen)
    with pytest.raises(SidecarError, match="exactly one token"):
        validate_model_sidecar(_tokens(av, char="\u3200"), qwen.tokenizer, qwen.model.config)
    with pytest.raises(SidecarError, match="exactly one token"):
        make_token_meta(qwen.tokenizer, DEFAULT_AV_TEMPLATE, DEFAULT_AR_TEMPLATE, char="\u3200")


def test_depth_template(tiny):
    av, ar = _sidecars(tiny, DEPTH_AV_TEMPLATE, k=2)
    validate_model_sidecar(av, tiny.tokenizer, tiny.model.config)
    validate_model_sidecar(ar, tiny.tokenizer, tiny.model.config)  # no depth for the AR: skipped
    with pytest.raises(SidecarError, match="extraction_layer_index is required"):
        validate_model_sidecar(dataclasses.replace(av, extraction_layer_index=None),
                               tiny.tokenizer, tiny.model.config)


def test_text_config_of_multimodal_config(qwen):
    av, _ = _sidecars(qwen)
    cfg = qwen.model.config
    wrapper = SimpleNamespace(text_config=SimpleNamespace(hidden_size=cfg.hidden_size,
                                                          num_hidden_layers=cfg.num_hidden_layers))
    validate_model_sidecar(av, qwen.tokenizer, wrapper)


def test_validate_dataset_sidecar(tiny):
    tm = make_token_meta(tiny.tokenizer, DEFAULT_AV_TEMPLATE, DEFAULT_AR_TEMPLATE)
    sc = DatasetSidecar(dataset_id="d", stage="ar_sft", row_count=5, base_model=str(tiny.path),
                        d_model=tiny.d_model, layer_index=2, corpus="toy", positions_per_doc=1,
                        tokens=tm, av_template=DEFAULT_AV_TEMPLATE, ar_template=DEFAULT_AR_TEMPLATE)
    cfg = tiny.model.config
    validate_dataset_sidecar(sc, tiny.tokenizer, cfg)
    with pytest.raises(SidecarError, match=rf"extraction\.d_model: expected 32, found {tiny.d_model}"):
        validate_dataset_sidecar(dataclasses.replace(sc, d_model=32), tiny.tokenizer, cfg)
    with pytest.raises(SidecarError, match=r"extraction\.layer_index"):
        validate_dataset_sidecar(dataclasses.replace(sc, layer_index=9), tiny.tokenizer, cfg)
    bad = dataclasses.replace(sc, tokens=dataclasses.replace(tm, right_id=tm.right_id + 3))
    with pytest.raises(SidecarError, match=rf"injection_right_neighbor_id: expected {tm.right_id + 3}, "
                                           rf"found {tm.right_id}"):
        validate_dataset_sidecar(bad, tiny.tokenizer, cfg)


def test_extras_with_tuples_and_numpy_scalars_are_written_plain(tmp_path):
    np = pytest.importorskip("numpy")
    sc = DatasetSidecar(dataset_id="d", stage="base", row_count=3, base_model="tiny", d_model=64,
                        layer_index=2, corpus="toy", positions_per_doc=1,
                        extras={"stats": {"dropped": np.int64(2), "mean_norm": np.float32(1.5)},
                                "hard_negatives": {"k": 20, "layers": (1, 2)}})
    back = read_dataset_sidecar(write_dataset_sidecar(tmp_path / "base.parquet", sc))
    assert back.extras == {"stats": {"dropped": 2, "mean_norm": 1.5},
                           "hard_negatives": {"k": 20, "layers": [1, 2]}}
    assert type(back.extras["stats"]["dropped"]) is int
